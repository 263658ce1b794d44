"""ACNet v1 (Ding et al., ICCV 2019): a kxk, a 1xk and a kx1 conv, each with its BN.

Every naming of it found in the wild is one dialect here (upstream current and
legacy with ``last_bn``, upstream 2019, mmcv-style ports, PaddleClas, Keras 2
h5); the generic shape rule (:mod:`acnet_convert.generic`) and user TOML files
describe the same family. ACNet's own geometry rule, :func:`validate_acnet`:
an odd square kernel of 3 or more, and exactly one 1xk and one kx1 branch of
odd length no longer than the square (told apart by shape, not by name: some
ports swap what "ver" and "hor" mean). Upstream-named blocks may carry a fourth,
dilated branch (``corner_conv``/``corner_bn``: a 2x2 conv with dilation 2, the
square's corners), fused like the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from acnet_convert.families._names import TORCH_PREFIX, conv_bn
from acnet_convert.naming import BranchNames, Dialect, bn_names

__all__ = ["DIALECTS", "GENERIC", "acnet_problem", "validate_acnet"]


def validate_acnet(geometry: Any) -> str | None:
    """ACNet's rule on a block's :class:`~acnet_convert.blocks.BlockGeometry`; a problem or None."""
    return acnet_problem(
        [(b.key, b.kernel, b.dilation) for b in geometry.branches], (geometry.kh, geometry.kw)
    )


def acnet_problem(
    branches: Sequence[tuple[str, tuple[int, int], int]], square: tuple[int, int] | None = None
) -> str | None:
    """ACNet's rule on ``(key, kernel extent, dilation)`` per branch, the square first.

    ``square`` is the target's kernel (default: the first branch's). Dilated
    branches (upstream's corner conv) are extra and not counted as 1-D ones.

    >>> acnet_problem([("sq", (3, 3), 1), ("h", (1, 3), 1), ("v", (3, 1), 1)]) is None
    True
    """
    kh, kw = square or branches[0][1]
    if kh != kw or kh % 2 == 0 or kh < 3:
        return (
            f"'{branches[0][0]}' has a {kh}x{kw} kernel; an asymmetric block needs an odd "
            "square kernel of size 3 or more"
        )
    others = [(key, kernel) for key, kernel, dilation in branches[1:] if dilation == 1]
    kinds = sorted(
        "hor" if h == 1 and w > 1 else "ver" if w == 1 and h > 1 else "bad" for _, (h, w) in others
    )
    if len(others) != 2 or kinds != ["hor", "ver"]:
        listing = " and ".join(f"'{key}' {list(kernel)}" for key, kernel in others)
        return f"the 1-D kernels {listing} are not one 1xk and one kx1"
    for key, (h, w) in others:
        if max(h, w) % 2 == 0 or max(h, w) > kh:
            return (
                f"'{key}' is {h}x{w}; a 1-D kernel must have odd length no longer "
                f"than the {kh}x{kh} square"
            )
    return None


def _torch_branch(conv: str, bn: str, role: str = "") -> BranchNames:
    return BranchNames(
        f"{{p}}{conv}.weight", f"{{p}}{conv}.bias", bn_names(f"{{p}}{bn}"), role=role or conv
    )


def _keras_branch(layer: str) -> BranchNames:
    # Keras 2 h5: group <layer>, dataset <layer>/<weight>:0 inside it.
    return BranchNames(
        f"{layer}/{layer}/kernel:0",
        f"{layer}/{layer}/bias:0",
        bn_names(f"{layer}_bn/{layer}_bn", style="keras"),
        role=layer.replace("{n}_", ""),
    )


GENERIC = Dialect(
    name="generic",
    description="any port: a kxk, a 1xk and a kx1 conv under one parent, told apart by shape "
    "(tried last, only when no named dialect matches)",
    anchor=None,
    fused_weight="{p}fused_conv.weight",
    fused_bias="{p}fused_conv.bias",
    label="{p}",
    validate=validate_acnet,
)

DIALECTS: tuple[Dialect, ...] = (
    Dialect(
        name="acnet",
        description="upstream ACNet (acnet/acb.py): square_conv/hor_conv/ver_conv + *_bn, "
        "optional last_bn (legacy: 1x3/3x1 on any square)",
        anchor=TORCH_PREFIX + r"square_conv\.weight",
        square=_torch_branch("square_conv", "square_bn"),
        branches=(_torch_branch("hor_conv", "hor_bn"), _torch_branch("ver_conv", "ver_bn")),
        # a fourth branch some variants add: a 2x2 conv with dilation 2 (the square's corners)
        extra_branches=(
            BranchNames(
                "{p}corner_conv.weight",
                "{p}corner_conv.bias",
                bn_names("{p}corner_bn"),
                optional=True,
                dilation=2,
                role="corner_conv",
            ),
        ),
        last_bn=bn_names("{p}last_bn"),
        fused_weight="{p}fused_conv.weight",
        fused_bias="{p}fused_conv.bias",
        label="{p}",
        validate=validate_acnet,
    ),
    Dialect(
        name="acnet-2019",
        description="upstream ACNet of 2019 (acnet_builder.py): square_layer/square_BN, "
        "horizontal_layer/horizontal_BN (1x3), vertical_layer/vertical_BN (3x1)",
        anchor=TORCH_PREFIX + r"square_layer\.weight",
        square=_torch_branch("square_layer", "square_BN"),
        branches=(
            _torch_branch("horizontal_layer", "horizontal_BN"),
            _torch_branch("vertical_layer", "vertical_BN"),
        ),
        fused_weight="{p}fused_conv.weight",
        fused_bias="{p}fused_conv.bias",
        label="{p}",
        validate=validate_acnet,
    ),
    Dialect(
        name="mmcv",
        description="mmcv-style ports: conv_kxk/conv_1xk/conv_kx1, "
        "each a ConvModule with .conv and .bn",
        anchor=TORCH_PREFIX + r"conv_kxk\.conv\.weight",
        square=conv_bn("conv_kxk"),
        branches=(conv_bn("conv_1xk"), conv_bn("conv_kx1")),
        fused_weight="{p}fused_conv.weight",
        fused_bias="{p}fused_conv.bias",
        label="{p}",
        # timm's RepVggBlock/MobileOneBlock also have conv_kxk.conv: a block with
        # neither 1-D branch is not mmcv's.
        requires_any=("{p}conv_1xk.conv.weight", "{p}conv_kx1.conv.weight"),
        validate=validate_acnet,
    ),
    Dialect(
        name="paddle",
        description="PaddleClas ResNet_ACNet: <n>_acsquare/_achor/_acver_weights, BN "
        "bn<n[3:]>_acsquare_{scale,offset,mean,variance} (bn_conv1_... for conv1); "
        "fused: <n>_acsquare_weights + <n>_acsquare_bias",
        anchor=r"(?P<n>.+)_acsquare_weights",
        # PaddleClas' ResNet_ACNet: bn_name = "bn_" + name if name == "conv1" else "bn" + name[3:]
        derived=(("b", "n", ((r"conv1", r"bn_conv1"), (r"...(.+)", r"bn\1"))),),
        # A fluid conv2d named '<n>.acsquare.conv2d.output.1' without bias_attr=False gets an
        # auto-named bias: folded like any conv bias when present.
        square=BranchNames(
            "{n}_acsquare_weights",
            "{n}.acsquare.conv2d.output.1.b_0",
            bn_names("{b}_acsquare", style="paddle"),
            role="acsquare",
        ),
        branches=(
            BranchNames(
                "{n}_achor_weights", None, bn_names("{b}_achor", style="paddle"), role="achor"
            ),
            BranchNames(
                "{n}_acver_weights", None, bn_names("{b}_acver", style="paddle"), role="acver"
            ),
        ),
        fused_weight="{n}_acsquare_weights",
        fused_bias="{n}_acsquare_bias",
        label="{n}",
        validate=validate_acnet,
    ),
    Dialect(
        name="keras",
        description="Keras 2 .h5 ports: layers <n>_sqr, <n>_hor, <n>_ver and <layer>_bn, "
        "HWIO kernels, "
        "BN eps 1e-3; fused: layer <n> with kernel:0 and bias:0",
        anchor=r"(?P<n>[^/]+)_sqr/(?P=n)_sqr/kernel:0",
        square=_keras_branch("{n}_sqr"),
        branches=(_keras_branch("{n}_hor"), _keras_branch("{n}_ver")),
        fused_weight="{n}/{n}/kernel:0",
        fused_bias="{n}/{n}/bias:0",
        label="{n}",
        kernel_order="HWIO",
        default_eps=1e-3,
        validate=validate_acnet,
    ),
)
