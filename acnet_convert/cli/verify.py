"""``acnet-convert verify`` and ``acnet-convert archs``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from acnet_convert.choices import COMPUTE_DTYPES, VERIFY_LAYOUTS
from acnet_convert.cli.app import (
    _EXIT_HELP,
    _load_patterns,
    _parse_network,
    _parse_renames,
    _require_folder,
    _status,
    _stderr,
    _write_text,
    cli,
)
from acnet_convert.cli.options import (
    batch_option,
    eps_option,
    input_shape_option,
    json_option,
    layout_option,
    naming_options,
    network_options,
    quiet_option,
    rename_option,
    seed_option,
    tolerance_options,
    trust_option,
)
from acnet_convert.cli.render import _escape, _render_archs, _render_verify, _show_result
from acnet_convert.errors import (
    ACNetConvertError,
    UsageError,
)

if TYPE_CHECKING:
    from acnet_convert.verify import VerifyOptions, VerifyResult

__all__ = ["archs", "verify"]


@cli.command(epilog=_EXIT_HELP)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path), metavar="TRAIN FUSED")
@network_options(
    arch_help="Rebuild both nets as this built-in architecture (see --list-archs). "
    "[default: the one TRAIN's keys match, else block by block]",
    model_help="Rebuild both nets from your own factory (FILE.py:FACTORY or "
    "package.module:FACTORY), which builds the training-time net.",
)
@click.option(
    "--blocks",
    "blocks_only",
    is_flag=True,
    help="Check block by block even where an architecture matches.",
)
@click.option("--list-archs", is_flag=True, help="List the built-in architectures and exit.")
@layout_option("FUSED's layout; auto: found from its keys.", choices=VERIFY_LAYOUTS, default="auto")
@naming_options(
    family_help="Force TRAIN's block family or naming dialect (see 'inspect'). "
    "[default: what FUSED records, else detected]",
    patterns_help="TOML file defining extra naming dialects, as given to 'fuse'.",
)
@rename_option("The renames given to 'fuse' (repeatable). [default: what FUSED records]")
@eps_option("BatchNorm epsilon. [default: the dialect's in block mode, the nets' own otherwise]")
@seed_option("Seed of the random input batch.")
@batch_option(8, "Random inputs per check.")
@input_shape_option("Shape of one random input. [default: the architecture's]")
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Real input batch [N, C, H, W]: a .npy file, or a .pt file holding one tensor.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu, cuda or cuda:N (auto: CUDA where present). TF32 is off on CUDA.",
)
@click.option(
    "--dtype",
    type=click.Choice(COMPUTE_DTYPES),
    default="float32",
    show_default=True,
    help="Dtype both nets run in.",
)
@tolerance_options(
    "1e-5 in float32, 1e-10 in float64; 1e-5 where FUSED is stored in float32, "
    "1e-2 float16, 5e-2 bfloat16"
)
@click.option(
    "--junit",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the result as JUnit XML to this file, for CI.",
)
@click.option(
    "--allow-extra",
    is_flag=True,
    help="Pass although FUSED holds tensors that TRAIN does not explain (block mode).",
)
@quiet_option("No notes or summary on stderr.")
@trust_option
@json_option
def verify(
    paths: tuple[Path, ...],
    model_arg: tuple[str, ...],
    input_shape: str | None,
    blocks_only: bool,
    list_archs: bool,
    patterns: Path | None,
    rename: tuple[str, ...],
    junit: Path | None,
    quiet: bool,
    as_json: bool,
    **fields: Any,
) -> None:
    """Check that FUSED computes the same function as TRAIN: verify TRAIN FUSED.

    \b
    With --arch (or when TRAIN's keys match one built-in architecture) or
    --model, both nets are rebuilt, loaded strictly and run on the same batch.
    Otherwise every block is rebuilt on its own (training-time branches vs
    the fused conv from FUSED) and checked, which needs no architecture.

    Reports max absolute and relative difference, cosine similarity and, for
    classifiers, top-1 agreement. Exit 1 names the blocks that differ.
    """
    if list_archs:
        _render_archs(as_json)
        return
    if len(paths) != 2:
        raise UsageError("verify takes TRAIN FUSED (or --list-archs)")
    from acnet_convert.extras import require_torch

    require_torch("verify")
    from acnet_convert.verify import VerifyOptions, junit_xml, raise_for_result

    train, fused = paths
    _require_folder("--junit", junit)
    with _junit_on_error(junit, train, fused):
        model_args, shape = _parse_network(model_arg, input_shape)
        # The options named as VerifyOptions' fields (--arch, --seed, --device...) pass as given.
        options = VerifyOptions(
            **fields,
            model_args=model_args,
            input_shape=shape,
            blocks=blocks_only,
            extra_dialects=_load_patterns(patterns),
            renames=_parse_renames(rename),
        )
        result = _run_verify(train, fused, options, quiet)
    if junit is not None:
        _write_text(junit, junit_xml(result))
    _show_result(result, _render_verify, quiet=quiet, as_json=as_json)
    if result.passed and not quiet:
        _stderr().print(_verified_line(result, train, fused))
    raise_for_result(result)


@contextlib.contextmanager
def _junit_on_error(junit: Path | None, train: Path, fused: Path) -> Iterator[None]:
    """With --junit, a user error still leaves a JUnit file (one errored case) for CI."""
    try:
        yield
    except ACNetConvertError as error:
        if junit is not None:
            from acnet_convert.verify import junit_error_xml

            _write_text(junit, junit_error_xml(str(train), str(fused), str(error)))
        raise


def _run_verify(train: Path, fused: Path, options: VerifyOptions, quiet: bool) -> VerifyResult:
    from acnet_convert.verify import verify_checkpoints

    with _status(f"verifying {fused.name} against {train.name}...", quiet=quiet):
        return verify_checkpoints(train, fused, options)


def _verified_line(result: VerifyResult, train: Path, fused: Path) -> str:
    """The one line a passing verify ends with: what was checked, and the closest call."""
    checks = result.checks()
    numeric = [c for c in (*result.cases, *result.block_checks) if c.max_rel == c.max_rel]
    worst = max(numeric, key=lambda c: c.max_rel, default=None)
    figure = f", max_rel {worst.max_rel:.3g}" if worst is not None else ""
    return (
        f"verified: {_escape(str(fused))} computes what {_escape(str(train))} computes "
        f"({len(checks)} check(s){figure}; rtol {result.rtol:g}, atol {result.atol:g})"
    )


@cli.command(epilog=_EXIT_HELP)
@json_option
def archs(as_json: bool) -> None:
    """List the built-in architectures 'verify --arch' can rebuild."""
    _render_archs(as_json)
