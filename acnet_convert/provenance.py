"""What a fused checkpoint says about where it came from, and the notes a conversion leaves.

:func:`fuse_metadata` is the provenance written into the output (version,
dialect, layout, eps, the source's sha256, renames, aliases);
:class:`BackgroundDigest` computes that sha256 while the blocks are fused;
:func:`fuse_notes` says what the output leaves out of the source, and why.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path

from acnet_convert import __version__
from acnet_convert.checkpoint import CheckpointReader, Container
from acnet_convert.errors import BadCheckpointError
from acnet_convert.families import family_title
from acnet_convert.families.convbn import FOLD_BN
from acnet_convert.keyfit import a_few
from acnet_convert.plan import FuseOptions, FusionPlan

__all__ = [
    "BackgroundDigest",
    "extension_notes",
    "found_notes",
    "fuse_metadata",
    "fuse_notes",
    "plan_notes",
    "sha256_file",
]

# Keras full-model files describe the network in these root attributes; after
# fusing they would describe the training-time net, so the output keeps weights only.
_TRAINING_TIME_METADATA = ("model_config", "training_config")


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces into one reused buffer.

    ``stop``, when set, ends the reading early (the result is then meaningless).
    """
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while (n := fh.readinto(buffer)) and not (stop is not None and stop.is_set()):
            digest.update(view[:n])
    return digest.hexdigest()


class BackgroundDigest:
    """The sha256 of a file, computed in a thread while the caller does other work.

    hashlib and file reads release the GIL, so with a second core the digest
    (a full read of the source, the slowest single step after the fusing
    itself) costs no wall time until :meth:`hexdigest` is asked for it.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stop = threading.Event()
        self._digest = ""
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="acnet-convert-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._digest = sha256_file(self._path, self._stop)
        except OSError as err:
            self._error = err

    def hexdigest(self) -> str:
        """Wait for the digest.

        Raises:
            BadCheckpointError: the file could not be read to the end.
        """
        self._thread.join()
        if self._error is not None:
            raise BadCheckpointError(
                f"{self._path}: cannot be read to the end: {self._error.strerror or self._error}"
            ) from self._error
        return self._digest

    def cancel(self) -> None:
        """Stop reading and wait for the thread, so no file stays open behind the caller."""
        self._stop.set()
        self._thread.join()


def fuse_metadata(
    reader: CheckpointReader,
    plan: FusionPlan,
    options: FuseOptions,
    *,
    source_name: str,
    digest: str,
    blocks_fused: int,
) -> dict[str, str]:
    """The output's metadata: the source's, less its training-time network, plus provenance."""
    metadata = {k: v for k, v in reader.metadata.items() if k not in _TRAINING_TIME_METADATA}
    metadata.update(
        {
            "acnet_convert.version": __version__,
            "acnet_convert.eps": repr(plan.eps),
            "acnet_convert.blocks_fused": str(blocks_fused),
            "acnet_convert.dialect": plan.dialect_names,
            "acnet_convert.layout": options.layout,
            "acnet_convert.source_sha256": digest,
            "acnet_convert.source": source_name,
        }
    )
    if options.renames:
        metadata["acnet_convert.renames"] = json.dumps([list(r) for r in options.renames])
    if options.eps is not None:
        metadata["acnet_convert.eps_option"] = repr(options.eps)
    if plan.fold_bn or options.fold_bn is False:
        metadata["acnet_convert.fold_bn"] = "true" if plan.fold_bn else "false"
    aliases = {b.spec.label: b.alias_of for b in plan.blocks if b.alias_of}
    aliases.update({f"{a} ({d})": p for a, d, p in plan.dropped_aliases})
    if aliases:
        metadata["acnet_convert.aliases"] = json.dumps(aliases)
    return metadata


def _dropped_entries(container: Container, fmt: str) -> list[tuple[str, str]]:
    """Container entries the output does not keep, each with the reason."""
    out: list[tuple[str, str]] = []
    for key in container.dropped:
        if re.search(r"optim|sched|scaler|ema|swa", key, re.IGNORECASE):
            why = "training-time state (optimizer, scheduler, ...), meaningless after fusing"
        else:
            why = "it holds more than plain data (an object such as an argparse.Namespace)"
        out.append((key, why))
    if fmt != "pth":
        out += [(key, f"a {fmt} file holds tensors only") for key in container.extras]
    return out


def extension_notes(source: Path) -> tuple[str, ...]:
    """The note that the file's extension does not match its content, if so (a 32-byte read)."""
    from acnet_convert.checkpoint.sniff import extension_note, sniff_format

    note = extension_note(source, sniff_format(source))
    return (note,) if note else ()


def fuse_notes(
    reader: CheckpointReader, plan: FusionPlan, fmt: str, source: Path
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(notes, dropped container keys)`` of writing ``reader``'s conversion as ``fmt``."""
    dropped_entries = _dropped_entries(reader.container, fmt)
    notes = tuple(f"dropped '{k}' from the container: {why}" for k, why in dropped_entries)
    notes += tuple(
        f"dropped the '{k}' attribute: it describes the training-time network; "
        "the output holds weights only (load them with load_weights)"
        for k in _TRAINING_TIME_METADATA
        if k in reader.metadata
    )
    notes += plan_notes(plan)
    notes += extension_notes(source)
    return notes, tuple(k for k, _ in dropped_entries)


def plan_notes(plan: FusionPlan) -> tuple[str, ...]:
    """What people should know about a plan: aliases fused once or dropped, epsilons,
    folded conv+BN units, tensors passed through unfused, shape-only detection."""
    notes = list(found_notes(plan))
    notes += [
        f"passed through '{s.name}' unfused (--allow-unfused): it looks like {s.what}"
        for s in plan.suspects
    ]
    if plan.dialect.anchor is None and plan.dialect is not FOLD_BN:
        notes.append(
            "blocks were found by kernel shape alone (generic dialect); "
            "check them with 'acnet-convert inspect' or name them with --patterns"
        )
    return tuple(notes)


def found_notes(plan: FusionPlan, *, ahead: bool = False) -> tuple[str, ...]:
    """The notes on what the plan found and how it fuses it (what ``inspect`` shows too,
    ``ahead`` of fusing): aliases, the epsilons used, folded conv+BN units."""
    notes = [
        f"block '{b.spec.label}' holds the same tensors as '{b.alias_of}' (a module registered "
        "twice): fused once, written under both names"
        for b in plan.blocks
        if b.alias_of
    ]
    notes += [
        f"dropped the keys of the '{dialect}' block '{alias}': they hold the same tensors as the "
        f"'{plan.dialect.name}' block '{primary}' (another naming of it)"
        for alias, dialect, primary in plan.dropped_aliases
    ]
    return (*notes, *_eps_notes(plan), *_fold_notes(plan, ahead))


def _eps_notes(plan: FusionPlan) -> list[str]:
    notes = []
    used = [k for b in plan.blocks for k in b.consumed if k in plan.bn_eps]
    if used:
        values = ", ".join(f"{e:g}" for e in sorted({plan.bn_eps[k] for k in used}))
        notes.append(
            f"used the epsilon the file declares for each of {len(used)} BN(s) ({values}) "
            "instead of the dialect's default; --eps overrides it"
        )
    if plan.eps_overridden:
        key, declared = plan.eps_overridden[0]
        notes.append(
            f"--eps {plan.eps:g} overrides the epsilon the file declares for "
            f"{len(plan.eps_overridden)} BN(s) (e.g. {declared:g} for '{key}')"
        )
    return notes


def _fold_notes(plan: FusionPlan, ahead: bool) -> list[str]:
    folded = [b for b in plan.blocks if b.spec.family == FOLD_BN.family]
    if not folded:
        return []
    units = f"{len(folded)} plain conv+BN unit{'s' if len(folded) > 1 else ''}"
    listed = a_few([repr(b.spec.label) for b in folded], 3, more=", ...")
    verb = "fuse folds" if ahead else "folded"
    if plan.fold_bn_by_default:
        titles = "/".join(family_title(f) for f in plan.fold_bn_by_default)
        return [
            f"{verb} {units} into conv weight + bias ({listed}) by default: {titles} deploy "
            "nets fold them; --no-fold-bn keeps them"
        ]
    return [f"--fold-bn: {verb} {units.replace('plain ', '')} into conv weight + bias ({listed})"]
