"""The names and defaults the command line offers, importing nothing.

Each tuple here is a copy of a list owned by a library module (named beside
it). Those modules import numpy (and the families' registry every family),
so the command line reads its choices from here instead: ``--help`` and
option parsing stay fast and need neither numpy nor torch.
``tests/test_cli_choices.py`` fails when a copy drifts from its source.

>>> from acnet_convert.choices import LAYOUTS
>>> LAYOUTS
('deploy', 'baseline', 'baseline-bias')
"""

__all__ = [
    "COMPUTE_DTYPES",
    "DEFAULT_LOSS_THRESHOLD_DB",
    "FAMILIES",
    "FORMATS",
    "LAYOUTS",
    "VERIFY_LAYOUTS",
]

# acnet_convert.checkpoint.FORMATS: the formats 'fuse --to' writes.
FORMATS: tuple[str, ...] = ("pth", "hdf5", "safetensors", "pdparams")

# acnet_convert.layouts.LAYOUTS: how a fused block is named ('fuse/inspect --layout').
LAYOUTS: tuple[str, ...] = ("deploy", "baseline", "baseline-bias")

# acnet_convert.verify.options.LAYOUT_CHOICES: 'verify --layout' (auto: from FUSED's keys).
VERIFY_LAYOUTS: tuple[str, ...] = ("auto", *LAYOUTS)

# acnet_convert.verify.options.COMPUTE_DTYPES: what 'verify --dtype' runs both nets in.
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "float64")

# acnet_convert.families.FAMILIES: the built-in block families '--family' names.
FAMILIES: tuple[str, ...] = ("acnet", "dbb", "repvgg", "repconv", "mobileone", "timm", "replknet")

# acnet_convert.quant.DEFAULT_LOSS_THRESHOLD_DB: '--loss-threshold' of inspect and export.
DEFAULT_LOSS_THRESHOLD_DB = 20.0
