"""User-defined dialects from TOML (``--patterns``): the worked example, and bad files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from acnet_convert.dialects import get_dialect
from acnet_convert.errors import UsageError
from acnet_convert.patterns import load_patterns, parse_patterns

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "patterns.toml"
ROWCOL = ROOT / "fixtures" / "dialects" / "rowcol_port.safetensors"

MINIMAL = """
[[dialect]]
name = "mine"
anchor = '(?P<p>(?:.+\\.)?)main\\.conv\\.weight'
fused_weight = "{p}fused.weight"
fused_bias = "{p}fused.bias"

[dialect.square]
weight = "{p}main.conv.weight"
bn = "{p}main.bn"

[[dialect.branches]]
weight = "{p}row.conv.weight"
bn = "{p}row.bn"

[[dialect.branches]]
weight = "{p}col.conv.weight"
bn = "{p}col.bn"
"""


def test_example_file_loads() -> None:
    (dialect,) = load_patterns(EXAMPLE)
    assert dialect.name == "rowcol"
    assert dialect.fields_for("features.0.main.conv.weight") == {"p": "features.0."}
    assert dialect.fields_for("main.conv.weight") == {"p": ""}
    assert dialect.square is not None and dialect.square.bn.var == "{p}main.bn.running_var"


def test_readme_example_works_through_the_cli(tmp_path: Path, run_cli: Any) -> None:
    shown = run_cli("inspect", ROWCOL, "--patterns", EXAMPLE)
    assert "rowcol" in shown.stdout
    out = tmp_path / "deploy.safetensors"
    result = run_cli("fuse", ROWCOL, out, "--patterns", EXAMPLE, "--json", "-q")
    report = json.loads(result.stdout)
    assert report["dialect"] == "rowcol" and report["blocks_fused"] == 2
    from safetensors.numpy import load_file

    fused = load_file(str(out))
    assert sorted(k for k in fused if ".main." in k) == [
        "features.0.main.conv.bias",
        "features.0.main.conv.weight",
        "features.1.main.conv.bias",
        "features.1.main.conv.weight",
    ]
    assert not any(".row." in k or ".col." in k or ".bn." in k for k in fused)
    assert fused["features.0.main.conv.weight"].shape == (8, 3, 3, 3)


def test_user_dialect_can_be_forced_by_name(tmp_path: Path, run_cli: Any) -> None:
    result = run_cli("inspect", ROWCOL, "--patterns", EXAMPLE, "--dialect", "rowcol", "--json")
    assert json.loads(result.stdout)["dialect"] == "rowcol"


def test_builtin_dialects_are_in_the_same_form() -> None:
    """The built-in dialects, written as TOML, load into the very same objects."""
    acnet = parse_patterns(
        """
[[dialect]]
name = "acnet-copy"
description = "x"
anchor = '(?P<p>(?:.+\\.)?)square_conv\\.weight'
label = "{p}"
fused_weight = "{p}fused_conv.weight"
fused_bias = "{p}fused_conv.bias"
last_bn = "{p}last_bn"
square = { weight = "{p}square_conv.weight", bias = "{p}square_conv.bias", bn = "{p}square_bn" }
branches = [
  { weight = "{p}hor_conv.weight", bias = "{p}hor_conv.bias", bn = "{p}hor_bn" },
  { weight = "{p}ver_conv.weight", bias = "{p}ver_conv.bias", bn = "{p}ver_bn" },
]
"""
    )[0]
    builtin = get_dialect("acnet")
    assert (acnet.anchor, acnet.square, acnet.branches, acnet.last_bn) == (
        builtin.anchor,
        builtin.square,
        builtin.branches,
        builtin.last_bn,
    )
    paddle = parse_patterns(
        """
[[dialect]]
name = "paddle-copy"
anchor = '(?P<n>.+)_acsquare_weights'
label = "{n}"
bn_style = "paddle"
fused_weight = "{n}_acsquare_weights"
fused_bias = "{n}_acsquare_bias"
square = { weight = "{n}_acsquare_weights", bias = "{n}.acsquare.conv2d.output.1.b_0", bn = "{b}_acsquare" }
branches = [
  { weight = "{n}_achor_weights", bn = "{b}_achor" },
  { weight = "{n}_acver_weights", bn = "{b}_acver" },
]
derived = [{ name = "b", source = "n", rules = [['conv1', 'bn_conv1'], ['...(.+)', 'bn\\1']] }]
"""
    )[0]
    builtin = get_dialect("paddle")
    assert (paddle.square, paddle.branches, paddle.derived) == (
        builtin.square,
        builtin.branches,
        builtin.derived,
    )
    keras = parse_patterns(
        """
[[dialect]]
name = "keras-copy"
anchor = '(?P<n>[^/]+)_sqr/(?P=n)_sqr/kernel:0'
kernel_layout = "HWIO"
default_eps = 1e-3
fused_weight = "{n}/{n}/kernel:0"
fused_bias = "{n}/{n}/bias:0"
[dialect.square]
weight = "{n}_sqr/{n}_sqr/kernel:0"
bias = "{n}_sqr/{n}_sqr/bias:0"
[dialect.square.bn]
weight = "{n}_sqr_bn/{n}_sqr_bn/gamma:0"
bias = "{n}_sqr_bn/{n}_sqr_bn/beta:0"
mean = "{n}_sqr_bn/{n}_sqr_bn/moving_mean:0"
var = "{n}_sqr_bn/{n}_sqr_bn/moving_variance:0"
[[dialect.branches]]
weight = "{n}_hor/{n}_hor/kernel:0"
bias = "{n}_hor/{n}_hor/bias:0"
bn = "{n}_hor_bn/{n}_hor_bn"
[[dialect.branches]]
weight = "{n}_ver/{n}_ver/kernel:0"
bias = "{n}_ver/{n}_ver/bias:0"
[dialect.branches.bn]
weight = "{n}_ver_bn/{n}_ver_bn/gamma:0"
bias = "{n}_ver_bn/{n}_ver_bn/beta:0"
mean = "{n}_ver_bn/{n}_ver_bn/moving_mean:0"
var = "{n}_ver_bn/{n}_ver_bn/moving_variance:0"
"""
    )[0]
    builtin = get_dialect("keras")
    assert (
        keras.square == builtin.square
        and keras.kernel_layout == "HWIO"
        and keras.default_eps == 1e-3
    )
    assert keras.branches is not None and builtin.branches is not None
    assert keras.branches[1] == builtin.branches[1]
    assert keras.branches[0].weight == builtin.branches[0].weight


def test_templates_naming_a_group_the_anchor_lacks_are_refused_before_reading(
    tmp_path: Path, run_cli: Any
) -> None:
    toml = tmp_path / "p.toml"
    lines = MINIMAL.splitlines()
    lines[3] = "anchor = '(?P<n>.+)_acsquare_weights'"
    toml.write_text("\n".join(lines))
    result = run_cli("inspect", ROWCOL, "--patterns", toml, expect=2)
    assert "names {p}, which the anchor does not define (it defines: {n})" in result.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t + "\n[extra]\nx = 1\n", "unknown top-level field 'extra'"),
        (
            lambda t: t.replace('name = "mine"', 'name = "mine"\ncolour = "red"'),
            "dialect 'mine': unknown field 'colour' in 'dialect'; "
            "known fields: anchor, bn_style, branches",
        ),
        (
            lambda t: t.replace('bn = "{p}main.bn"', 'bn = "{p}main.bn"\nshape = "kxk"'),
            "dialect 'mine': unknown field 'shape' in 'square'",
        ),
        (
            lambda t: t.replace(
                'bn = "{p}main.bn"', 'bn = { weight = "a", bias = "b", mean = "c", vari = "d" }'
            ),
            "unknown field 'vari' in 'square.bn'",
        ),
        (
            lambda t: t.replace(
                'bn = "{p}main.bn"', 'bn = { weight = "a", bias = "b", mean = "c" }'
            ),
            "'square.bn' lacks the required field 'var'",
        ),
        (
            lambda t: t.replace('fused_bias = "{p}fused.bias"\n', ""),
            "lacks the required field 'fused_bias'",
        ),
        (
            lambda t: t.replace("(?P<p>(?:.+\\.)?)main", "(?P<p>(?:.+\\.)?main"),
            "'anchor' is not a valid regular expression (missing ), unterminated subpattern",
        ),
        (
            lambda t: t.replace("(?P<p>(?:.+\\.)?)main", "(?:.+\\.)?main"),
            "'anchor' has no named group",
        ),
        (
            lambda t: t.replace('"{p}row.bn"', '"{q}row.bn"'),
            "'branches[0].bn.weight' = '{q}row.bn.weight' names {q}, "
            "which the anchor does not define (it defines: {p})",
        ),
        (
            lambda t: t.replace('"{p}fused.bias"', '"{p.x}fused.bias"'),
            "'{p.x}' is not a plain field name",
        ),
        (
            lambda t: t.replace('"{p}fused.bias"', '"{p}fused.bias}"'),
            "'fused_bias' = '{p}fused.bias}'",
        ),
        (
            lambda t: t.replace('"{p}fused.bias"', '"{p}fused.weight"'),
            "'fused_weight' and 'fused_bias' are the same",
        ),
        (
            lambda t: t.split('[[dialect.branches]]\nweight = "{p}col')[0],
            "'branches' must be an array of exactly two tables",
        ),
        (
            lambda t: t.replace('name = "mine"', 'name = "acnet"'),
            "dialect 'acnet': the name is taken by a built-in",
        ),
        (lambda t: t + t, "dialect 'mine': the name is taken by another dialect here"),
        (lambda t: t.replace('name = "mine"', 'name = "my dialect"'), "may hold only letters"),
        (
            lambda t: t.replace('name = "mine"', 'name = "mine"\nkernel_layout = "NCHW"'),
            '\'kernel_layout\' must be "OIHW" or "HWIO"',
        ),
        (
            lambda t: t.replace('name = "mine"', 'name = "mine"\ndefault_eps = -1.0'),
            "'default_eps' must be a positive number",
        ),
        (
            lambda t: t.replace('name = "mine"', 'name = "mine"\nbn_style = "jax"'),
            "'bn_style' must be",
        ),
        (
            lambda t: t.replace('name = "mine"', 'name = "mine"\nlabel = 3'),
            "'label' must be a non-empty string, got int 3",
        ),
        (
            lambda t: t.replace(
                'name = "mine"',
                'name = "mine"\nderived = [{ name = "b", source = "q", rules = [["x", "y"]] }]',
            ),
            "'derived[0].source' 'q' is not an anchor group",
        ),
        (
            lambda t: t.replace(
                'name = "mine"',
                'name = "mine"\nderived = [{ name = "b", source = "p", rules = [["(x", "y"]] }]',
            ),
            "'derived[0].rules[0][0]' is not a valid regular expression",
        ),
        (
            lambda t: t.replace(
                'name = "mine"',
                'name = "mine"\n'
                'derived = [{ name = "b", source = "p", rules = [["(x)", "\\\\2"]] }]',
            ),
            "'derived[0].rules[0][1]' = '\\\\2' is not a valid replacement",
        ),
        (
            lambda t: t.replace(
                'name = "mine"',
                'name = "mine"\nderived = [{ name = "b", source = "p", rules = ["x"] }]',
            ),
            "must be a [regex, replacement] pair of strings",
        ),
        (
            lambda t: t.replace(
                'name = "mine"',
                'name = "mine"\nderived = [{ name = "p", source = "p", rules = [["x", "y"]] }]',
            ),
            "'derived[0].name' 'p' must be a new identifier",
        ),
        (lambda t: "dialect = 3\n", "no [[dialect]] table found"),
        (lambda t: "", "no [[dialect]] table found"),
        (lambda t: t.replace("[[dialect]]", "[[dialect]"), "not valid TOML"),
    ],
)
def test_invalid_patterns_are_usage_errors(edit: Any, message: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_patterns(edit(MINIMAL), "p.toml")
    text = str(err.value)
    assert message in text, text
    assert text.startswith("p.toml: ")
    assert "\n" not in text


def test_minimal_dialect_and_derived_fields_work() -> None:
    text = (
        MINIMAL.replace(
            'name = "mine"',
            'name = "mine"\n'
            'derived = [{ name = "u", source = "p", rules = [["(.*)acb\\\\.", "\\\\1"]] }]',
        )
        .replace('"{p}fused.weight"', '"{u}conv.weight"')
        .replace('"{p}fused.bias"', '"{u}conv.bias"')
    )
    (dialect,) = parse_patterns(text)
    assert (
        dialect.label == "{p}" and dialect.default_eps == 1e-5 and dialect.kernel_layout == "OIHW"
    )
    fields = dialect.fields_for("s1.acb.main.conv.weight")
    assert fields == {"p": "s1.acb.", "u": "s1."}
    assert dialect.fused_weight.format(**fields) == "s1.conv.weight"


def test_bad_patterns_file_through_the_cli(tmp_path: Path, run_cli: Any) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace('"{p}col.bn"', '"{n}col.bn"'))
    result = run_cli("fuse", ROWCOL, out_dir / "o.safetensors", "--patterns", bad, expect=2)
    assert f"{bad}: dialect 'mine': 'branches[1].bn.weight'" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert list(out_dir.iterdir()) == []
    missing = run_cli(
        "fuse", ROWCOL, out_dir / "o.safetensors", "--patterns", tmp_path / "nope.toml", expect=2
    )
    assert "nope.toml: no such file" in missing.stderr
    folder = run_cli("inspect", ROWCOL, "--patterns", tmp_path, expect=2)
    assert "is a folder" in folder.stderr
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "cannot be read" in run_cli("inspect", ROWCOL, "--patterns", binary, expect=2).stderr
    assert list(out_dir.iterdir()) == []


def test_user_dialect_that_overlaps_a_builtin_one_is_ambiguous(
    tmp_path: Path, run_cli: Any
) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text(
        MINIMAL.replace("main\\.conv", "conv_kxk\\.conv")
        .replace("{p}main.conv", "{p}conv_kxk.conv")
        .replace("{p}main.bn", "{p}conv_kxk.bn")
        .replace("{p}row.", "{p}conv_1xk.")
        .replace("{p}col.", "{p}conv_kx1.")
    )
    src = ROOT / "fixtures" / "dialects" / "mmcv_shared.pth"
    result = run_cli("inspect", src, "--patterns", toml, "--json", expect=3)
    assert "'mine' (3 blocks" in result.stderr and "'mmcv' (3 blocks" in result.stderr
    forced = run_cli("inspect", src, "--patterns", toml, "--dialect", "mine", "--json")
    assert json.loads(forced.stdout)["dialect"] == "mine"
    assert np.isfinite(json.loads(forced.stdout)["totals"]["params_after_fusing"])
