"""The asymmetric convolution block as a torch module, and its switch to deploy form.

:class:`ACBlock` is a drop-in for :class:`torch.nn.Conv2d` whose state-dict names
match upstream ACNet's ``acnet/acb.py`` (``square_conv``, ``square_bn``,
``hor_conv``, ``hor_bn``, ``ver_conv``, ``ver_bn``, optional ``last_bn``; in
deploy form ``fused_conv``), so checkpoints move between upstream code, this
package and the command line.

Its forward pass keeps the 1-D branches centre-aligned with the square window
in every geometry ``nn.Conv2d`` accepts, where upstream's does not: with a
padding smaller than ``dilation * (k // 2)`` the 1-D branches see a cropped
input, and with dilation the crop/pad amount scales with the dilation. Every
padding mode works, because padding by ``p`` and then cropping ``c`` equals
padding by ``p - c`` for zeros, reflect, replicate and circular padding alike.

Fusion itself is :func:`acnet_convert.fusion.fuse_block` (float64 numpy); a
block's tensors are read and checked by :mod:`acnet_convert.torch_blocks` (ACNet's
one rule, as ``fuse`` applies it); this module only moves tensors in and out.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from acnet_convert.errors import UnfusableBlockError, UsageError
from acnet_convert.families.acnet import acnet_problem
from acnet_convert.fusion import fuse_block
from acnet_convert.torch_blocks import (
    BRANCHES,
    REQUIRED_BRANCHES,
    block_label,
    block_tensors_from_module,
)

__all__ = [
    "ACBlock",
    "DeployReport",
    "block_tensors_from_module",
    "find_acblocks",
    "switch_to_deploy",
]

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
_PADDING_MODES: tuple[PaddingMode, ...] = ("zeros", "reflect", "replicate", "circular")
_SQUARE = BRANCHES[0]


def _pair(value: int | tuple[int, ...], what: str) -> tuple[int, int]:
    """``v`` -> ``(v, v)``; a pair stays a pair; anything else is a UsageError."""
    if isinstance(value, bool):
        raise UsageError(f"ACBlock: {what} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return value, value
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise UsageError(f"ACBlock: {what} must be an int or a pair of ints, got {value!r}")


def _kernel_size(value: int | tuple[int, ...]) -> int:
    """The one side of the square kernel, where ACNet's rule takes the block ACBlock builds."""
    kh, kw = _pair(value, "kernel_size")
    # the three convs ACBlock builds from it
    kernels = [("square_conv", (kh, kw), 1), ("hor_conv", (1, kw), 1), ("ver_conv", (kh, 1), 1)]
    if acnet_problem(kernels):
        raise UsageError(
            f"ACBlock: kernel_size must be a square, odd size of at least 3, got {value!r}; "
            "use nn.Conv2d for 1x1 and even kernels"
        )
    return kh


def _padding(
    padding: int | tuple[int, ...] | str, k: int, stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int]:
    if not isinstance(padding, str):
        return _pair(padding, "padding")
    if padding == "valid":
        return (0, 0)
    if padding == "same" and stride == (1, 1):
        return (dilation[0] * (k // 2), dilation[1] * (k // 2))
    raise UsageError(
        f"ACBlock: padding={padding!r} is not supported; give 'valid', "
        "'same' (stride 1 only) or an int"
    )


@dataclass(frozen=True)
class _Geometry:
    """An ACBlock's conv geometry, checked as nn.Conv2d and ACNet's rule check it."""

    kernel_size: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    padding_mode: PaddingMode

    @property
    def centre(self) -> tuple[int, int]:
        """Offset of the centre row/column from the square window's top/left edge."""
        half = self.kernel_size // 2
        return self.dilation[0] * half, self.dilation[1] * half


def _geometry(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...],
    padding: int | tuple[int, ...] | str,
    dilation: int | tuple[int, ...],
    groups: int,
    padding_mode: str,
) -> _Geometry:
    """ACBlock's arguments checked and normalised; a UsageError names the one that is wrong."""
    k = _kernel_size(kernel_size)
    stride_ = _pair(stride, "stride")
    dilation_ = _pair(dilation, "dilation")
    padding_ = _padding(padding, k, stride_, dilation_)
    if min(stride_) < 1 or min(dilation_) < 1 or min(padding_) < 0:
        raise UsageError(
            f"ACBlock: stride {stride_} and dilation {dilation_} must be >= 1 and "
            f"padding {padding_} >= 0"
        )
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise UsageError(
            f"ACBlock: in_channels={in_channels} and out_channels={out_channels} "
            f"must both be divisible by groups={groups}"
        )
    if padding_mode not in _PADDING_MODES:
        raise UsageError(
            f"ACBlock: padding_mode={padding_mode!r} is not one of {', '.join(_PADDING_MODES)}"
        )
    return _Geometry(k, stride_, padding_, dilation_, groups, padding_mode)


class ACBlock(nn.Module):
    """A kxk conv trained as three BN'd branches (kxk, 1xk, kx1), fusable into one conv.

    Args mirror :class:`torch.nn.Conv2d` (``kernel_size`` odd and >= 3, no
    ``bias``: the BNs supply it), plus upstream's ``deploy`` and ``use_affine``
    (affine branch BNs), ``use_last_bn`` (a BN after the sum, as in 2020-era
    upstream) and ``eps`` for every BN. ``padding`` may also be ``"valid"`` or
    ``"same"`` (stride 1 only).

    Raises:
        UsageError: for a geometry nn.Conv2d would refuse or an ACB cannot have.

    >>> block = ACBlock(8, 16, 3, padding=1).eval()
    >>> y = block(torch.randn(1, 8, 10, 10)); block.switch_to_deploy()
    >>> sorted(block.state_dict())
    ['fused_conv.bias', 'fused_conv.weight']
    """

    last_bn: nn.BatchNorm2d | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_affine: bool = True,
        use_last_bn: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        geometry = _geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = geometry.kernel_size
        self.stride = geometry.stride
        self.padding = geometry.padding
        self.dilation = geometry.dilation
        self.groups = geometry.groups
        self.padding_mode: PaddingMode = geometry.padding_mode
        self.deploy = deploy
        centre = geometry.centre
        # Where the padding is smaller than the centre's offset, the 1-D branch crops instead.
        self._hor_crop = max(0, centre[0] - self.padding[0])
        self._ver_crop = max(0, centre[1] - self.padding[1])
        if deploy:
            self.fused_conv = self._square_geometry_conv(bias=True)
            self.register_module("last_bn", None)
        else:
            self._add_branches(centre, use_affine, use_last_bn, eps)

    def _add_branches(
        self, centre: tuple[int, int], use_affine: bool, use_last_bn: bool, eps: float
    ) -> None:
        """The training form's convs and BNs, registered in upstream acb.py's order."""
        k, padding = self.kernel_size, self.padding

        def conv(kernel: tuple[int, int], pad: tuple[int, int]) -> nn.Conv2d:
            return nn.Conv2d(
                self.in_channels, self.out_channels, kernel, stride=self.stride, padding=pad,
                dilation=self.dilation, groups=self.groups, bias=False,
                padding_mode=self.padding_mode,
            )  # fmt: skip

        def bn(affine: bool) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(self.out_channels, eps=eps, affine=affine)

        self.square_conv = conv((k, k), padding)
        self.square_bn = bn(use_affine)
        # Registration order follows upstream acb.py: ver before hor.
        self.ver_conv = conv((k, 1), (padding[0], max(0, padding[1] - centre[1])))
        self.hor_conv = conv((1, k), (max(0, padding[0] - centre[0]), padding[1]))
        self.ver_bn = bn(use_affine)
        self.hor_bn = bn(use_affine)
        # Upstream's last_bn is always affine.
        self.register_module("last_bn", bn(True) if use_last_bn else None)

    def _square_geometry_conv(self, bias: bool) -> nn.Conv2d:
        k = self.kernel_size
        return nn.Conv2d(
            self.in_channels, self.out_channels, (k, k), stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups, bias=bias,
            padding_mode=self.padding_mode,
        )  # fmt: skip

    def extra_repr(self) -> str:
        """The nn.Conv2d-style geometry, for ``print(model)``."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, padding_mode={self.padding_mode!r}, deploy={self.deploy}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """The sum of the three BN'd branches (training form) or the fused conv (deploy)."""
        if self.deploy:
            fused: Tensor = self.fused_conv(x)
            return fused
        out: Tensor = self.square_bn(self.square_conv(x))
        hor_in = x
        if self._hor_crop:
            hor_in = x.narrow(2, self._hor_crop, x.shape[2] - 2 * self._hor_crop)
        ver_in = x
        if self._ver_crop:
            ver_in = x.narrow(3, self._ver_crop, x.shape[3] - 2 * self._ver_crop)
        out = out + self.hor_bn(self.hor_conv(hor_in))
        out = out + self.ver_bn(self.ver_conv(ver_in))
        if self.last_bn is not None:
            out = self.last_bn(out)
        return out

    def get_equivalent_kernel_bias(self, name: str = "") -> tuple[Tensor, Tensor]:
        """The fused kernel and bias, in the square conv's dtype and device.

        ``name`` (the block's name in its model) only labels error messages.

        Raises:
            UnfusableBlockError: for a block already in deploy form, or one whose
                BNs keep no running statistics or hold non-finite values.
        """
        if self.deploy:
            raise UnfusableBlockError(
                f"{block_label(self, name)} is already in deploy form; nothing to fuse"
            )
        return _fused_tensors(self, name)

    def switch_to_deploy(self, name: str = "") -> None:
        """Replace the branches by ``fused_conv`` in place; a no-op in deploy form.

        ``name`` (the block's name in its model) only labels error messages.
        """
        if self.deploy:
            return
        kernel, bias = self.get_equivalent_kernel_bias(name)
        fused = self._square_geometry_conv(bias=True).to(device=kernel.device, dtype=kernel.dtype)
        _copy_into(fused, kernel, bias)
        for branch in REQUIRED_BRANCHES:
            delattr(self, branch.conv)
            delattr(self, branch.bn)
        self.last_bn = None
        self.fused_conv = fused
        self.deploy = True


def _copy_into(conv: nn.Conv2d, kernel: Tensor, bias: Tensor) -> None:
    if conv.bias is None:  # pragma: no cover - every fused conv is built with a bias
        raise UnfusableBlockError("internal error: fused conv built without a bias")
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)


@dataclass(frozen=True)
class DeployReport:
    """What :func:`switch_to_deploy` converted: how many blocks, and their module names."""

    count: int
    names: tuple[str, ...]
    model: Any = field(default=None, repr=False, compare=False)  # the converted model


def find_acblocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every training-form block in ``model``: a module with square, hor and ver convs.

    Blocks are found by structure, so upstream's ``ACBlock`` (any era that uses
    these names) counts as well as this package's.

    >>> net = nn.Sequential(ACBlock(3, 4, 3, padding=1), nn.ReLU())
    >>> [name for name, _ in find_acblocks(net)]
    ['0']
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if all(isinstance(getattr(module, b.conv, None), nn.Module) for b in REQUIRED_BRANCHES)
    ]


def _fused_tensors(module: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """Fuse ``module`` in float64; return kernel and bias like its square conv's weight."""
    kernel, bias = fuse_block(block_tensors_from_module(module, name=name))
    if not (np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
        raise UnfusableBlockError(
            f"{block_label(module, name)}: the fused kernel is not finite; check the BNs' running_var "
            "and eps for non-positive or non-finite values"
        )
    like = getattr(getattr(module, _SQUARE.conv), "weight", None)
    if not isinstance(like, Tensor):  # pragma: no cover - checked by block_tensors_from_module
        raise UnfusableBlockError(f"{block_label(module, name)}: '{_SQUARE.conv}' has no weight")
    return (
        torch.from_numpy(kernel).to(device=like.device, dtype=like.dtype),
        torch.from_numpy(bias).to(device=like.device, dtype=like.dtype),
    )


def _deploy_block_like(module: nn.Module, name: str) -> ACBlock:
    """An ACBlock in deploy form with the geometry of a foreign block's square conv."""
    square = getattr(module, _SQUARE.conv)
    if not isinstance(square, nn.Conv2d):
        raise UnfusableBlockError(f"block '{name}': '{_SQUARE.conv}' is not an nn.Conv2d")
    padding = square.padding
    if isinstance(padding, str):
        raise UnfusableBlockError(f"block '{name}': string padding {padding!r} is not supported")
    kernel, bias = _fused_tensors(module, name)
    block = ACBlock(
        square.in_channels, square.out_channels, square.kernel_size, stride=square.stride,
        padding=padding, dilation=square.dilation, groups=square.groups,
        padding_mode=square.padding_mode, deploy=True,
    )  # fmt: skip
    block.to(device=kernel.device, dtype=kernel.dtype)
    _copy_into(block.fused_conv, kernel, bias)
    return block


def switch_to_deploy(model: nn.Module, *, inplace: bool = True) -> DeployReport:
    """Fuse every training-form block of ``model`` (in place, or in a deep copy).

    The fused conv computes what the block computes in eval mode (BN with its
    running statistics); a model in train mode gets a warning, since its
    output changes: call ``model.eval()`` first. With ``inplace=False`` the
    model is left as it is and a converted deep copy is returned as
    ``report.model`` (as timm's ``reparameterize_model`` does).

    This package's :class:`ACBlock` switches itself; any other module found by
    :func:`find_acblocks` (upstream's ACBlock, for instance) is replaced in its
    parent by an :class:`ACBlock` in deploy form, which has the same state-dict
    names (``<block>.fused_conv.weight``/``.bias``) and computes the same thing.
    The fused weights are computed in float64 by
    :func:`acnet_convert.fusion.fuse_block` from the BNs' running statistics
    (eval-mode semantics) and cast back to each block's dtype and device.

    Raises:
        UnfusableBlockError: for a block that cannot be fused; nothing after it
            is converted.
        UsageError: when ``model`` itself is a foreign block (wrap it first).

    >>> net = nn.Sequential(ACBlock(3, 4, 3, padding=1))
    >>> switch_to_deploy(net)
    DeployReport(count=1, names=('0',))
    """
    if model.training and find_acblocks(model):
        warnings.warn(
            f"switch_to_deploy: the {type(model).__name__} is in train mode; the fused convs "
            "compute eval-mode BatchNorm (running statistics), so its output changes. Call "
            "model.eval() first (or switch_to_deploy(model, inplace=False) to keep this one)",
            UserWarning,
            stacklevel=2,
        )
    if not inplace:
        model = copy.deepcopy(model)
    names: list[str] = []
    for name, module in find_acblocks(model):
        if isinstance(module, ACBlock):
            module.switch_to_deploy(name)
        elif not name:
            raise UsageError(
                f"the model itself is a {type(module).__name__} block; wrap it in a "
                "container (e.g. nn.Sequential) so it can be replaced"
            )
        else:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            parent.register_module(child, _deploy_block_like(module, name))
        names.append(name)
    return DeployReport(count=len(names), names=tuple(names), model=model)
