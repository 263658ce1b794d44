"""Upstream ACNet's architectures, key-for-key compatible with upstream state dicts.

The networks of the ACNet paper's results table, each buildable in three forms:

- ``"train"``: ACBs in training form (``<u>.square_conv.weight``, ``<u>.hor_bn.*``, ...),
  what upstream ``ACNetBuilder(deploy=False)`` builds and trains;
- ``"deploy"``: ACBs fused (``<u>.fused_conv.weight`` and ``.bias``), what
  ``ACNetBuilder(deploy=True)`` builds and upstream's converter writes;
- ``"baseline"``: the plain network upstream ``ConvBuilder`` builds
  (``<u>.conv.weight`` without bias, ``<u>.bn.*``).

Importing this package does not import torch; building a model does.

>>> sorted(ARCHS)
['cfqkbnc', 'src56', 'sres18', 'sres34', 'sres50', 'vc', 'wrnc16plain']
>>> match_arch(arch_keys("src56", "train"))
['src56']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from acnet_convert.checkpoint.containers import bare_name
from acnet_convert.errors import UsageError
from acnet_convert.keyfit import NON_WEIGHT_KEYS, is_counter

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ARCHS",
    "FORMS",
    "ArchRow",
    "ArchSpec",
    "Form",
    "arch_keys",
    "arch_rows",
    "build_arch",
    "check_form",
    "match_arch",
]

Form = Literal["train", "deploy", "baseline"]
FORMS: tuple[Form, ...] = ("train", "deploy", "baseline")


def check_form(form: str) -> Form:
    """``form`` itself when it is one of :data:`FORMS`.

    Raises:
        UsageError: naming the forms there are.
    """
    for known in FORMS:
        if form == known:
            return known
    raise UsageError(f"unknown form {form!r}; use one of: {', '.join(FORMS)}")


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: its name, what it is, its input and output, and its builder.

    ``build(form="train", **kw)`` returns a fresh ``nn.Module``; ``kw`` may set
    ``num_classes``.
    """

    name: str
    description: str
    input_shape: tuple[int, int, int]
    num_classes: int
    build: Callable[..., nn.Module]


def _cfqkbnc(form: str = "train", **kw: Any) -> nn.Module:
    from acnet_convert.zoo.cifar import CifarQuick

    return CifarQuick(form, **kw)


def _vc(form: str = "train", **kw: Any) -> nn.Module:
    from acnet_convert.zoo.cifar import CifarVGG

    return CifarVGG(form, **kw)


def _src56(form: str = "train", **kw: Any) -> nn.Module:
    from acnet_convert.zoo.cifar import CifarResNet

    return CifarResNet(form, **kw)


def _wrnc16plain(form: str = "train", **kw: Any) -> nn.Module:
    from acnet_convert.zoo.cifar import WideResNetCifar

    return WideResNetCifar(form, **kw)


def _sres18(form: str = "train", **kw: Any) -> nn.Module:
    from acnet_convert.zoo.imagenet import ImageNetResNet

    return ImageNetResNet(form, depth=18, **kw)


def _sres34(form: str = "train", **kw: Any) -> nn.Module:
    from acnet_convert.zoo.imagenet import ImageNetResNet

    return ImageNetResNet(form, depth=34, **kw)


def _sres50(form: str = "train", **kw: Any) -> nn.Module:
    from acnet_convert.zoo.imagenet import StagewiseResNet50

    return StagewiseResNet50(form, **kw)


_CIFAR = (3, 32, 32)
_IMAGENET = (3, 224, 224)
ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec(
            "cfqkbnc",
            "Cifar-quick with BN on CIFAR-10: three 5x5 convs (ACBs with 1x5/5x1 branches)",
            _CIFAR, 10, _cfqkbnc,
        ),
        ArchSpec("vc", "VGG-16 on CIFAR-10: 13 3x3 convs, two linear layers", _CIFAR, 10, _vc),
        ArchSpec("src56", "ResNet-56 on CIFAR-10: 3 stages of 9 basic blocks", _CIFAR, 10, _src56),
        ArchSpec(
            "wrnc16plain",
            "WRN-16-8 on CIFAR-10: pre-activation wide blocks and a model-level last_bn",
            _CIFAR, 10, _wrnc16plain,
        ),
        ArchSpec("sres18", "ResNet-18 on ImageNet, plain 7x7 stem", _IMAGENET, 1000, _sres18),
        ArchSpec("sres34", "ResNet-34 on ImageNet, plain 7x7 stem", _IMAGENET, 1000, _sres34),
        ArchSpec(
            "sres50",
            "ResNet-50 on ImageNet, upstream's stagewise layout (3x3 convs as ACBs)",
            _IMAGENET, 1000, _sres50,
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class ArchRow:
    """A built-in architecture as ``verify --list-archs`` shows it."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    num_classes: int

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }


def arch_rows() -> list[ArchRow]:
    """Every built-in architecture, in the registry's order."""
    return [
        ArchRow(name, spec.description, tuple(spec.input_shape), int(spec.num_classes))
        for name, spec in ARCHS.items()
    ]


def _spec(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise UsageError(
            f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHS))}"
        ) from None


def build_arch(name: str, form: str = "train", **kw: Any) -> nn.Module:
    """Build architecture ``name`` in ``form`` ("train", "deploy" or "baseline").

    Raises:
        UsageError: for an unknown name (listing the known ones) or form.

    >>> model = build_arch("cfqkbnc", "deploy")
    >>> "conv1.acb.fused_conv.bias" in model.state_dict()
    True
    """
    return _spec(name).build(form, **kw)


@cache
def arch_keys(name: str, form: str = "train") -> frozenset[str]:
    """The state-dict keys of ``name`` in ``form``; built on the meta device, so cheap.

    Raises:
        UsageError: for an unknown name or form.
    """
    import torch

    spec = _spec(name)
    with torch.device("meta"):
        model = spec.build(form)
    return frozenset(model.state_dict())


def match_arch(keys: Iterable[str]) -> list[str]:
    """The architectures whose train- or deploy-form state dict has exactly ``keys``.

    ``module.`` prefixes (DataParallel/DDP) are stripped first. A bare ``deps``
    key (upstream's hdf5 files carry one) is ignored, and a key set without any
    ``*.num_batches_tracked`` matches too, as older torch saved none.

    >>> match_arch(["conv1.weight"])
    []
    """
    given = {bare_name(k, ("module.",)) for k in keys} - NON_WEIGHT_KEYS
    has_nbt = any(is_counter(k) for k in given)
    found = []
    for name in ARCHS:
        for form in ("train", "deploy"):
            expected = arch_keys(name, form)
            if not has_nbt:
                expected = frozenset(k for k in expected if not is_counter(k))
            if given == expected:
                found.append(name)
                break
    return found
