#!/usr/bin/env python3
"""Longer fuzzing runs of ``acnet-convert fuse`` and ``inspect`` on damaged checkpoints.

The same mutations as tests/test_fuzz.py (truncation, bit flips, overwritten
byte ranges, lying safetensors header fields, edited .pth pickles, and the
round-2 attacks: pickle fragments calling bytearray(n), shared-reference and
tuple-hash nests, a nest as persistent id, a stride-0 view, and a deflated,
padded data.pkl), drawn from
a seeded generator: iteration I of seed S is always the same case, so any
finding can be replayed with ``--start I --iterations 1 --seed S``. Cases run
in-process in worker processes; a worker that dies (a crash in a native
library) is reported with the case that killed it, and a new worker carries on.

    python tools/fuzz_long.py --iterations 20000 --seed 1 --jobs 2
    python tools/fuzz_long.py --minutes 5

Prints the count of each exit code per command, every misbehaviour (an
exception, an exit code outside {0, 3}, a traceback, a Python warning, a leftover file, a
changed input, more than one error line) and a one-line summary. Exits 1 if
anything misbehaved.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _worker(seed: int, start: int, stop: int, step: int) -> None:
    """Run cases start, start+step, ... < stop; one JSON line per event on stdout."""
    from click.testing import CliRunner
    from test_fuzz import FORMATS, build_fixture, mutate, random_mutations, run_damaged

    from acnet_convert.cli import main

    class _Main:
        name = "acnet-convert"

        def main(self, args: list[str], prog_name: str | None = None, **extra: Any) -> None:
            main(args)

    def invoke(args: Any) -> Any:
        return CliRunner().invoke(_Main(), list(args), catch_exceptions=True)  # type: ignore[arg-type]

    with tempfile.TemporaryDirectory(prefix="acnet-fuzz-") as tmp:
        root = Path(tmp)
        fixtures = {fmt: build_fixture(fmt, _mkdir(root / fmt)).read_bytes() for fmt in FORMATS}
        for i in range(start, stop, step):
            rng = random.Random(f"{seed}:{i}")
            fmt = FORMATS[i % len(FORMATS)]
            mutations = random_mutations(rng, fmt, len(fixtures[fmt]))
            _emit({"begin": i, "format": fmt, "mutations": repr(mutations)})
            folder = _mkdir(root / f"case{i}")
            outcomes = run_damaged(invoke, mutate(fixtures[fmt], fmt, mutations), fmt, folder)
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()
            _emit(
                {
                    "done": i,
                    "format": fmt,
                    "results": [[o.command, o.exit_code, o.problem] for o in outcomes],
                }
            )


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


Tally = collections.Counter[tuple[str, str, Any]]


def _run_slice(
    seed: int, start: int, stop: int, step: int, deadline: float | None
) -> tuple[int, Tally, list[str]]:
    """Run one worker over a slice, restarting it past any case that kills it.

    Returns the number of cases run, the exit codes seen and the problems found.
    """
    ran = 0
    tally: Tally = collections.Counter()
    problems: list[str] = []
    while start < stop:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--seed",
            str(seed),
            "--start",
            str(start),
            "--stop",
            str(stop),
            "--step",
            str(step),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        current: dict[str, Any] | None = None
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            if "begin" in event:
                current = event
                continue
            ran += 1
            current = None
            for command, code, problem in event["results"]:
                tally[(event["format"], command, code)] += 1
                where = f"seed {seed} case {event['done']} ({event['format']}, {command})"
                if problem:
                    problems.append(f"{where}: {problem}")
            start = event["done"] + step
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return ran, tally, problems
        code = proc.wait()
        if current is None:
            return ran, tally, problems
        ran += 1
        tally[(current["format"], "worker", f"died {code}")] += 1
        problems.append(
            f"seed {seed} case {current['begin']} ({current['format']}): worker died with {code} "
            f"on mutations {current['mutations']}"
        )
        start = current["begin"] + step
    return ran, tally, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000, help="cases to run [2000]")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case number [0]")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--step", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.seed, args.start, args.stop, args.step)
        return 0

    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    deadline = started + args.minutes * 60 if args.minutes else None
    stop = args.start + args.iterations if deadline is None else 2**62
    jobs = max(1, args.jobs)
    with ThreadPoolExecutor(jobs) as pool:
        slices = list(
            pool.map(
                lambda j: _run_slice(args.seed, args.start + j, stop, jobs, deadline), range(jobs)
            )
        )
    ran = sum(s[0] for s in slices)
    tally: Tally = sum((s[1] for s in slices), collections.Counter())
    problems = [p for s in slices for p in s[2]]
    elapsed = time.monotonic() - started
    for (fmt, command, code), count in sorted(tally.items(), key=str):
        print(f"{fmt:12} {command:8} exit {code}: {count}")
    for problem in problems:
        print(f"PROBLEM {problem}")
    codes: collections.Counter[Any] = collections.Counter()
    for (_, _, code), count in tally.items():
        codes[code] += count
    by_code = ", ".join(f"exit {c}: {n}" for c, n in sorted(codes.items(), key=str))
    print(
        f"fuzz_long: {ran} damaged checkpoints (seed {args.seed}), {sum(codes.values())} runs of "
        f"fuse/inspect in {elapsed / 60:.1f} min; {by_code}; {len(problems)} problems"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
