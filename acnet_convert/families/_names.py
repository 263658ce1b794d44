"""Helpers the family tables share: torch-style branch templates under ``{p}``."""

from __future__ import annotations

from dataclasses import replace

from acnet_convert.naming import BNNames, BranchNames, bn_names

__all__ = ["TORCH_PREFIX", "bn_only", "conv_bn", "over_parameterized", "seq_conv_bn"]

# ``p`` includes its trailing dot, so a block at the top level has p == "".
TORCH_PREFIX = r"(?P<p>(?:.+\.)?)"


def conv_bn(stem: str, *, optional: bool = False, bn: str = "bn") -> BranchNames:
    """``<stem>.conv.weight`` (+ ``.bias``) and its BN ``<stem>.<bn>.*`` (a ConvBN unit)."""
    return BranchNames(
        f"{{p}}{stem}.conv.weight",
        f"{{p}}{stem}.conv.bias",
        bn_names(f"{{p}}{stem}.{bn}"),
        optional=optional,
        role=stem,
    )


def seq_conv_bn(stem: str, *, optional: bool = False) -> BranchNames:
    """``<stem>.0`` conv and ``<stem>.1`` BN (an ``nn.Sequential(conv, bn)``)."""
    return BranchNames(
        f"{{p}}{stem}.0.weight",
        f"{{p}}{stem}.0.bias",
        bn_names(f"{{p}}{stem}.1"),
        optional=optional,
        role=stem,
    )


def bn_only(stem: str) -> BranchNames:
    """An identity branch: a BN alone under ``<stem>``, present only when in == out."""
    names: BNNames = bn_names(f"{{p}}{stem}")
    return BranchNames(None, None, names, kind="identity", optional=True, role=stem)


def over_parameterized(
    convs: str, scale: str, skip: str
) -> tuple[str, BranchNames, tuple[BranchNames, ...]]:
    """MobileOne's block shape: anchor, primary and branches for N kxk ConvBNs ``<convs>.{i}``,
    an optional 1x1 ConvBN ``<scale>`` and an identity BN ``<skip>``."""
    anchor = TORCH_PREFIX + convs.replace(".", r"\.") + r"\.0\.conv\.weight"
    branches = (
        replace(conv_bn(f"{convs}.{{i}}", optional=True), repeat_from=1),
        conv_bn(scale, optional=True),
        bn_only(skip),
    )
    return anchor, conv_bn(f"{convs}.0"), branches
