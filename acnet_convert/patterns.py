"""User-defined naming dialects from a TOML file (``--patterns FILE.toml``).

A patterns file holds one or more ``[[dialect]]`` tables with the fields of
:class:`~acnet_convert.dialects.Dialect`, so a port the built-in dialects do
not know can be fused without writing code. ``examples/patterns.toml`` is a
worked example::

    [[dialect]]
    name = "rowcol"
    anchor = '(?P<p>(?:.+\\.)?)main\\.conv\\.weight'   # finds square kernels
    fused_weight = "{p}main.conv.weight"                # where the fused conv goes
    fused_bias = "{p}main.conv.bias"

    [dialect.square]
    weight = "{p}main.conv.weight"
    bn = "{p}main.bn"                 # a BN stem, expanded in bn_style

    [[dialect.branches]]              # exactly two; 1xk and kx1 told apart by shape
    weight = "{p}row.conv.weight"
    bn = "{p}row.bn"

    [[dialect.branches]]
    weight = "{p}col.conv.weight"
    bn = "{p}col.bn"

Fields of a ``[[dialect]]``: ``name``, ``anchor``, ``fused_weight``,
``fused_bias``, ``square``, ``branches`` (required); ``description``,
``label`` (default: the anchor's groups, ``"{p}"``), ``last_bn``,
``derived``, ``kernel_order`` (``"OIHW"`` or ``"HWIO"``; ``kernel_layout`` is its old
name, still read), ``default_eps``
(default 1e-5), ``bn_style`` (``"torch"``, ``"paddle"`` or ``"keras"``:
how a BN given as a stem string expands; default ``"torch"``), ``family``
(a family of its own, whose branches may be any number) and
``deploy_folds_bn`` (true: the family's deploy nets also fold plain conv+BN
units, so ``fuse`` does by default in a file whose blocks are all this
family's; default false).
A branch (``square`` and each of ``branches``) has ``weight``, optional
``bias``, and ``bn``: a stem string or a table with ``weight``, ``bias``,
``mean``, ``var`` and optional ``count``. ``last_bn`` is a BN the same way.
``derived`` is an array of ``{name, source, rules = [[regex, replacement], ...]}``.

Everything is checked before any checkpoint is read; every problem is a
:class:`~acnet_convert.errors.UsageError` naming the file, the dialect and
the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from acnet_convert.dialects import (
    ALL_DIALECTS,
    GENERIC,
    BNNames,
    BranchNames,
    Dialect,
    bn_names,
    template_fields,
)
from acnet_convert.errors import UsageError
from acnet_convert.families.acnet import validate_acnet

__all__ = ["load_patterns", "parse_patterns"]

_DIALECT_FIELDS = {
    "name",
    "description",
    "anchor",
    "label",
    "fused_weight",
    "fused_bias",
    "square",
    "branches",
    "last_bn",
    "derived",
    "kernel_layout",
    "kernel_order",
    "default_eps",
    "bn_style",
    "family",
    "deploy_folds_bn",
}
_REQUIRED = ("name", "anchor", "fused_weight", "fused_bias", "square", "branches")
_BRANCH_FIELDS = {"weight", "bias", "bn", "kind", "dilation", "optional"}
_TOML_KINDS = ("conv", "identity")
_BN_FIELDS = {"weight", "bias", "mean", "var", "count"}
_DERIVED_FIELDS = {"name", "source", "rules"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def load_patterns(path: Path) -> list[Dialect]:
    """Read and check the dialects defined in a TOML file.

    Raises:
        UsageError: the file is missing or not TOML, or a dialect in it is
            invalid (unknown or missing fields, wrong types, a bad regular
            expression, templates naming fields the anchor does not define,
            a name that is taken).

    Example:
        >>> [d.name for d in load_patterns(Path("examples/patterns.toml"))]  # doctest: +SKIP
        ['rowcol']
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise UsageError(f"--patterns {path}: no such file") from err
    except IsADirectoryError as err:
        raise UsageError(f"--patterns {path}: is a folder, not a TOML file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--patterns {path}: cannot be read ({err})") from err
    return parse_patterns(text, str(path))


def parse_patterns(text: str, source: str = "<patterns>") -> list[Dialect]:
    """The dialects defined in TOML ``text``; ``source`` names it in messages.

    Raises:
        UsageError: see :func:`load_patterns`.
    """
    toml = _toml_module(source)
    try:
        data = toml.loads(text)
    except toml.TOMLDecodeError as err:
        raise UsageError(f"{source}: not valid TOML: {err}") from err
    unknown = sorted(set(data) - {"dialect"})
    if unknown:
        raise UsageError(
            f"{source}: unknown top-level field '{unknown[0]}'; "
            "a patterns file holds only [[dialect]] tables"
        )
    tables = data.get("dialect")
    if isinstance(tables, dict):
        tables = [tables]
    if not isinstance(tables, list) or not tables:
        raise UsageError(f"{source}: no [[dialect]] table found; see examples/patterns.toml")
    taken = {d.name for d in (*ALL_DIALECTS, GENERIC)}
    dialects: list[Dialect] = []
    for index, table in enumerate(tables):
        dialect = _Parser(source, index).dialect(table)
        if dialect.name in taken:
            what = (
                "a built-in dialect"
                if dialect.name not in {d.name for d in dialects}
                else "another dialect here"
            )
            raise UsageError(
                f"{source}: dialect '{dialect.name}': the name is taken by {what}; choose another"
            )
        taken.add(dialect.name)
        dialects.append(dialect)
    return dialects


def _toml_module(source: str) -> Any:
    import importlib

    for name in ("tomllib", "tomli"):  # tomllib from Python 3.11 on, tomli before
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise UsageError(
        f"{source}: reading TOML needs Python 3.11 or the 'tomli' package (pip install tomli)"
    )


class _Parser:
    """Checks one ``[[dialect]]`` table; every message starts with the file and the dialect."""

    def __init__(self, source: str, index: int) -> None:
        self.source = source
        self.where = f"dialect #{index + 1}"

    def fail(self, message: str) -> UsageError:
        return UsageError(f"{self.source}: {self.where}: {message}")

    def table(
        self, value: Any, place: str, allowed: set[str], required: tuple[str, ...]
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"'{place}' must be a table, got {_kind(value)}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(
                f"unknown field '{unknown[0]}' in '{place}'; "
                f"known fields: {', '.join(sorted(allowed))}"
            )
        missing = [f for f in required if f not in value]
        if missing:
            raise self.fail(f"'{place}' lacks the required field '{missing[0]}'")
        return value

    def string(self, value: Any, place: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(f"'{place}' must be a non-empty string, got {_kind(value)}")
        return value

    def regex(self, value: Any, place: str) -> re.Pattern[str]:
        text = self.string(value, place)
        try:
            return re.compile(text)
        except re.error as err:
            raise self.fail(
                f"'{place}' is not a valid regular expression ({err}): {text!r}"
            ) from err

    def dialect(self, raw: Any) -> Dialect:
        if isinstance(raw, dict) and "name" in raw:
            name = self.string(raw["name"], "name")
            if not _NAME.fullmatch(name):
                raise self.fail(f"name {name!r} may hold only letters, digits and _ . + -")
            self.where = f"dialect '{name}'"
        table = self.table(raw, "dialect", _DIALECT_FIELDS, _REQUIRED)
        anchor = self.regex(table["anchor"], "anchor")
        groups = list(anchor.groupindex)
        if not groups:
            raise self.fail(
                "'anchor' has no named group; name the varying part, e.g. (?P<p>(?:.+\\.)?)"
            )
        derived = self.derived(table.get("derived", []), groups)
        style = table.get("bn_style", "torch")
        if style not in ("torch", "paddle", "keras"):
            raise self.fail(f'\'bn_style\' must be "torch", "paddle" or "keras", got {style!r}')
        parsed = self.branches(table, style)
        # two plain conv branches: an ACNet port (ACNet's rule, ACNet's family); else its own family
        acnet_like = len(parsed) == 2 and all(b.kind == "conv" and b.dilation == 1 for b in parsed)
        family = table.get("family", "acnet" if acnet_like else table["name"])
        dialect = Dialect(
            name=self.string(table["name"], "name"),
            description=self.string(
                table.get("description", f"user-defined ({self.source})"), "description"
            ),
            anchor=anchor.pattern,
            fused_weight=self.string(table["fused_weight"], "fused_weight"),
            fused_bias=self.string(table["fused_bias"], "fused_bias"),
            label=self.string(table.get("label", "".join(f"{{{g}}}" for g in groups)), "label"),
            square=self.branch(table["square"], "square", style),
            branches=parsed,
            family=self.string(family, "family"),
            exclusive=acnet_like,
            validate=validate_acnet if acnet_like else None,
            last_bn=self.bn(table["last_bn"], "last_bn", style) if "last_bn" in table else None,
            derived=derived,
            kernel_order=self.kernel_order(table),
            default_eps=self.default_eps(table),
            deploy_folds_bn=self.flag(table, "deploy_folds_bn"),
        )
        self.check_templates(dialect, groups + [d[0] for d in derived])
        return dialect

    def kernel_order(self, table: dict[str, Any]) -> str:
        order_field = "kernel_order" if "kernel_order" in table else "kernel_layout"
        order = table.get(order_field, "OIHW")
        if order not in ("OIHW", "HWIO"):
            raise self.fail(f'\'{order_field}\' must be "OIHW" or "HWIO", got {order!r}')
        return str(order)

    def flag(self, table: dict[str, Any], name: str) -> bool:
        value = table.get(name, False)
        if not isinstance(value, bool):
            raise self.fail(f"'{name}' must be true or false, got {value!r}")
        return value

    def default_eps(self, table: dict[str, Any]) -> float:
        eps = table.get("default_eps", 1e-5)
        if (
            isinstance(eps, bool)
            or not isinstance(eps, (int, float))
            or not (math.isfinite(eps) and eps > 0)
        ):
            raise self.fail(f"'default_eps' must be a positive number, got {eps!r}")
        return float(eps)

    def branches(self, table: dict[str, Any], style: str) -> tuple[BranchNames, ...]:
        branches = table["branches"]
        declared = "family" in table or (
            isinstance(branches, list)
            and any(isinstance(b, dict) and "kind" in b for b in branches)
        )
        if not isinstance(branches, list) or not branches or (not declared and len(branches) != 2):
            count = len(branches) if isinstance(branches, list) else _kind(branches)
            raise self.fail(
                f"'branches' must be an array of exactly two tables (the 1xk and kx1 branches, "
                f"[[dialect.branches]] twice), got {count}; a family of its own (a 'family' "
                "field, or branches with a 'kind') may have any number"
            )
        return tuple(self.branch(b, f"branches[{i}]", style) for i, b in enumerate(branches))

    def check_templates(self, dialect: Dialect, known: list[str]) -> None:
        for place, template in dialect.templates().items():
            self.check_template(template, place, known)
        if dialect.fused_weight == dialect.fused_bias:
            raise self.fail(
                "'fused_weight' and 'fused_bias' are the same template; "
                "the bias would overwrite the weight"
            )

    def check_template(self, template: str, place: str, known: list[str]) -> None:
        try:
            used = template_fields(template)
        except ValueError as err:
            raise self.fail(
                f"'{place}' = {template!r}: {err}; write a literal brace as '{{{{' or '}}}}'"
            ) from err
        for field in used:
            if field not in known:
                raise self.fail(
                    f"'{place}' = {template!r} names {{{field}}}, which the anchor does not define "
                    f"(it defines: {', '.join('{' + k + '}' for k in known)})"
                )

    def branch(self, raw: Any, place: str, style: str) -> BranchNames:
        kind = raw.get("kind", "conv") if isinstance(raw, dict) else "conv"
        if kind not in _TOML_KINDS:
            raise self.fail(f"'{place}.kind' must be one of {', '.join(_TOML_KINDS)}, got {kind!r}")
        required = ("bn",) if kind == "identity" else ("weight", "bn")
        table = self.table(raw, place, _BRANCH_FIELDS, required)
        bias = table.get("bias")
        dilation = table.get("dilation", 1)
        if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
            raise self.fail(f"'{place}.dilation' must be a positive integer, got {dilation!r}")
        optional = table.get("optional", kind == "identity")
        if not isinstance(optional, bool):
            raise self.fail(f"'{place}.optional' must be true or false, got {optional!r}")
        weight = table.get("weight")
        return BranchNames(
            weight=None if weight is None else self.string(weight, f"{place}.weight"),
            bias=None if bias is None else self.string(bias, f"{place}.bias"),
            bn=self.bn(table["bn"], f"{place}.bn", style),
            kind=kind,
            dilation=dilation,
            optional=optional,
        )

    def bn(self, raw: Any, place: str, style: str) -> BNNames:
        if isinstance(raw, str):
            return bn_names(self.string(raw, place), style)
        if not isinstance(raw, dict):
            raise self.fail(
                f"'{place}' must be a BN stem string or a table of keys, got {_kind(raw)}"
            )
        table = self.table(raw, place, _BN_FIELDS, ("weight", "bias", "mean", "var"))
        count = table.get("count")
        return BNNames(
            weight=self.string(table["weight"], f"{place}.weight"),
            bias=self.string(table["bias"], f"{place}.bias"),
            mean=self.string(table["mean"], f"{place}.mean"),
            var=self.string(table["var"], f"{place}.var"),
            count=None if count is None else self.string(count, f"{place}.count"),
        )

    def derived(
        self, raw: Any, groups: list[str]
    ) -> tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...]:
        if not isinstance(raw, list):
            raise self.fail(
                f"'derived' must be an array of tables ([[dialect.derived]]), got {_kind(raw)}"
            )
        known = list(groups)
        out: list[tuple[str, str, tuple[tuple[str, str], ...]]] = []
        for i, item in enumerate(raw):
            place = f"derived[{i}]"
            table = self.table(item, place, _DERIVED_FIELDS, ("name", "source", "rules"))
            name = self.string(table["name"], f"{place}.name")
            if not name.isidentifier() or name in known:
                raise self.fail(
                    f"'{place}.name' {name!r} must be a new identifier (taken: {', '.join(known)})"
                )
            source = self.string(table["source"], f"{place}.source")
            if source not in known:
                raise self.fail(
                    f"'{place}.source' {source!r} is not an anchor group "
                    "or an earlier derived field "
                    f"(known: {', '.join(known)})"
                )
            rules = table["rules"]
            if not isinstance(rules, list) or not rules:
                raise self.fail(
                    f"'{place}.rules' must be a non-empty array of [regex, replacement] pairs"
                )
            pairs: list[tuple[str, str]] = []
            for j, rule in enumerate(rules):
                where = f"{place}.rules[{j}]"
                if not (
                    isinstance(rule, list)
                    and len(rule) == 2
                    and all(isinstance(r, str) for r in rule)
                ):
                    raise self.fail(
                        f"'{where}' must be a [regex, replacement] pair of strings, got {rule!r}"
                    )
                pattern = self.regex(rule[0], f"{where}[0]")
                self.replacement(pattern, rule[1], f"{where}[1]")
                pairs.append((rule[0], rule[1]))
            known.append(name)
            out.append((name, source, tuple(pairs)))
        return tuple(out)

    def replacement(self, pattern: re.Pattern[str], replacement: str, place: str) -> None:
        # An alternative that always matches "" gives a match with every group of
        # ``pattern`` (unset), on which bad group references in ``replacement`` fail.
        probe = re.compile(f"(?:{pattern.pattern})|").fullmatch("")
        try:
            if probe is not None:
                probe.expand(replacement)
        except (re.error, IndexError) as err:
            raise self.fail(
                f"'{place}' = {replacement!r} is not a valid replacement for that regex ({err})"
            ) from err


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r}"
