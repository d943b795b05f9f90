"""How fast the CLI answers, and what it imports to do so.

    python benchmarks/bench_cli.py               # ~1 min: help x 10 runs each, debug-loss x 3
    python benchmarks/bench_cli.py --runs 20 --work-runs 5 --plot
    python benchmarks/bench_cli.py --help-only --before --runs 15  # help rows, now and before

Each measurement starts a fresh interpreter (``<python> -m meaning_transform ...``, which is
what the ``mtx`` script runs) and reports median (min-max) wall time over the runs:

- ``mtx --help`` and ``mtx <command> --help`` for every command, interleaved (each round
  runs all five once, in a rotated order, so a burst of load hits them alike): wall time,
  and whether torch, matplotlib, rich and pydantic were imported (none may be; target:
  median <= 0.3 s). ``PYTHONDONTWRITEBYTECODE=1`` in the environment means the package is
  compiled on every run (no ``.pyc``): the header says whether it is set.
- ``mtx debug-loss --json`` with default arguments (stdout discarded): wall time, peak
  resident memory of the child (``os.wait4``), how much of the time was spent importing
  torch and the rest of the package (``-X importtime``, cumulative), and whether
  matplotlib was imported (it must not be without ``--plot``).
- with ``--plot``: the same with ``--plot PATH``, to show matplotlib is loaded then.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import cpu_model  # noqa: E402

COMMANDS = ("debug-loss", "debug-extended", "anneal-demo", "check-grads")
# torch.optim's first optimizer imports torch._dynamo (torch/_compile.py), ~1 s; mtx's own
# training loop uses meaning_transform.optim.Adam so that it does not: watched and timed.
WATCHED = ("torch", "matplotlib", "numpy", "rich", "pydantic", "typer", "torch._dynamo")
# What --help must not import: torch and matplotlib (seconds), pydantic (~0.1 s, which Typer
# 0.29 loads to coerce option values), rich (~25 ms; the consoles are built on first use).
HELP_FORBIDDEN = ("torch", "matplotlib", "rich", "pydantic")
ALL = "<all top-level imports>"

# Runs the CLI in-process and reports, on stderr, which watched modules were imported.
WRAPPER = f"""
import json, sys
sys.argv = ["mtx", *json.loads(sys.argv[1])]
try:
    from meaning_transform.cli import main
    main()
except SystemExit:
    pass
finally:
    seen = {{m: m in sys.modules for m in {WATCHED!r}}}
    print("__MODULES__" + json.dumps(seen), file=sys.stderr)
"""

# The help path as it was before issue 13 (the "(before)" rows, run in the same rounds):
# Typer's root group with its unset flags left None, so Typer coerces them through pydantic,
# and cli.common importing secrets and diagnostics.findings at module level.
BEFORE = (
    "import secrets, meaning_transform.diagnostics.findings\n"
    "from typer.core import TyperGroup\n"
    "import meaning_transform.cli\n"
    "meaning_transform.cli._Group.parse_args = TyperGroup.parse_args\n"
) + WRAPPER

# The floor for time and memory: what importing torch alone costs in a fresh interpreter.
TORCH_ONLY = "import torch, sys; print('__MODULES__{}', file=sys.stderr)"


@dataclass(frozen=True)
class Run:
    seconds: float
    max_rss_mb: float
    modules: dict[str, bool]
    import_s: dict[str, float]  # cumulative import time of top-level packages (with -X importtime)


def run_once(args: list[str], importtime: bool = False, code: str = WRAPPER) -> Run:
    """One fresh interpreter running ``mtx *args`` (or ``code``); stdout discarded."""
    cmd = [sys.executable]
    if importtime:
        cmd += ["-X", "importtime"]
    cmd += ["-c", code, json.dumps(args)]
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # reap it ourselves: per-child peak RSS
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"mtx {' '.join(args)} exited with {proc.returncode}:\n{stderr}")
    rss = usage.ru_maxrss / 1024  # Linux reports KiB
    modules: dict[str, bool] = {}
    imports: dict[str, float] = {}
    for line in stderr.splitlines():
        if line.startswith("__MODULES__"):
            modules = json.loads(line[len("__MODULES__") :])
        elif line.startswith("import time:") and "|" in line:
            _, cumulative, raw = line[12:].split("|")
            if not cumulative.strip().isdigit():
                continue  # the header line
            name, spent = raw.strip(), int(cumulative) / 1e6
            if raw.startswith("   ") and not raw.startswith("    "):  # top level: 1 + 2 spaces
                imports[ALL] = imports.get(ALL, 0.0) + spent
            if name in WATCHED:
                imports[name] = imports.get(name, 0.0) + spent
    return Run(seconds, rss, modules, imports)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per --help command")
    parser.add_argument("--work-runs", type=int, default=3, help="runs of mtx debug-loss")
    parser.add_argument("--plot", action="store_true", help="also time debug-loss --plot")
    parser.add_argument(
        "--before", action="store_true", help="also time the help path as before issue 13"
    )
    parser.add_argument("--help-only", action="store_true", help="time the --help rows only")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    import platform

    print(
        f"machine: cpu={cpu_model()}, cores={os.cpu_count()}, python={platform.python_version()}, "
        f"interpreter={sys.executable}, load_average_at_start="
        f"{[round(x, 2) for x in os.getloadavg()]}, PYTHONDONTWRITEBYTECODE="
        f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')}"
    )
    results: dict[str, object] = {}

    # (label, argv, code): now and, with --before, as before issue 13, interleaved
    help_rows = [("mtx --help", ["--help"], WRAPPER)]
    help_rows += [(f"mtx {c} --help", [c, "--help"], WRAPPER) for c in COMMANDS]
    if args.before:
        help_rows += [(f"{label} (before)", argv, BEFORE) for label, argv, _ in help_rows]
    print(
        f"\nhelp: {args.runs} fresh runs each, interleaved; wall seconds median (min-max); "
        "target <= 0.3 s"
    )
    run_once(["--help"])  # warm the file cache once
    help_runs: list[list[Run]] = [[] for _ in help_rows]
    for round_ in range(args.runs):
        shift = round_ % len(help_rows)  # rotate the order each round
        for i in [*range(shift, len(help_rows)), *range(shift)]:
            help_runs[i].append(run_once(help_rows[i][1], code=help_rows[i][2]))
    print(f"{'command':<37} {'seconds':>20}  " + "  ".join(HELP_FORBIDDEN))
    for (label, _, _), runs in zip(help_rows, help_runs):
        secs = [r.seconds for r in runs]
        imported = {m: any(r.modules.get(m) for r in runs) for m in HELP_FORBIDDEN}
        flags = "  ".join(f"{'yes' if imported[m] else 'no':<{len(m)}}" for m in HELP_FORBIDDEN)
        ok = statistics.median(secs) <= 0.3 and not any(imported.values())
        print(f"{label:<37} {summary(secs):>20}  {flags}  {'ok' if ok else 'MISS'}")
        results[label] = {"seconds": secs, **imported}

    def work(label: str, argv: list[str], runs: int) -> None:
        timed = [run_once(argv) for _ in range(runs)]
        traced = run_once(argv, importtime=True)  # importtime slows imports: separate run
        secs = [r.seconds for r in timed]
        rss = [r.max_rss_mb for r in timed]
        torch_s = traced.import_s.get("torch", 0.0)
        dynamo_s = traced.import_s.get("torch._dynamo", 0.0)
        all_s = traced.import_s.get(ALL, 0.0)
        print(f"\n{label}: {runs} fresh runs")
        print(f"  wall seconds          {summary(secs)}")
        print(f"  peak RSS (MB)         {summary(rss)}")
        print(
            f"  imports (-X importtime run, {traced.seconds:.2f} s wall): all imports "
            f"{all_s:.2f} s ({100 * all_s / traced.seconds:.0f}%), of which torch {torch_s:.2f} s "
            f"and torch._dynamo {dynamo_s:.2f} s"
        )
        work_s = traced.seconds - all_s
        print(f"  the work (the rest)   {work_s:.2f} s ({100 * work_s / traced.seconds:.0f}%)")
        print(f"  matplotlib imported   {any(r.modules.get('matplotlib') for r in timed)}")
        print(f"  torch._dynamo imported {any(r.modules.get('torch._dynamo') for r in timed)}")
        results[label] = {
            "seconds": secs,
            "max_rss_mb": rss,
            "import_seconds": traced.import_s,
            "traced_seconds": traced.seconds,
            "matplotlib": any(r.modules.get("matplotlib") for r in timed),
        }

    if args.help_only:
        write_json(args.json, results)
        return

    floor = [run_once([], code=TORCH_ONLY) for _ in range(args.work_runs)]
    print(f"\nthe floor, a fresh interpreter that only imports torch: {args.work_runs} runs")
    print(f"  wall seconds          {summary([r.seconds for r in floor])}")
    print(f"  peak RSS (MB)         {summary([r.max_rss_mb for r in floor])}")
    results["import torch only"] = {
        "seconds": [r.seconds for r in floor],
        "max_rss_mb": [r.max_rss_mb for r in floor],
    }

    work("mtx debug-loss --json (defaults)", ["debug-loss", "--json"], args.work_runs)
    if args.plot:
        with tempfile.TemporaryDirectory() as tmp:
            png = str(Path(tmp) / "plot.png")
            work(
                "mtx debug-loss --json --plot PATH",
                ["debug-loss", "--json", "--plot", png, "--force"],
                1,
            )

    write_json(args.json, results)


def write_json(path: Path | None, results: dict[str, object]) -> None:
    if path is not None:
        path.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
