"""How fast the CLI answers, and what it imports to do so.

    python benchmarks/bench_cli.py               # ~1 min: help x 10 runs each, debug-loss x 3
    python benchmarks/bench_cli.py --runs 20 --work-runs 5 --plot

Each measurement starts a fresh interpreter (``<python> -m meaning_transform ...``, which is
what the ``mtx`` script runs) and reports median (min-max) wall time over the runs:

- ``mtx --help`` and ``mtx <command> --help`` for every command: wall time, and whether
  torch / matplotlib were imported (they must not be; target: median <= 0.3 s).
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
WATCHED = ("torch", "matplotlib", "numpy", "rich", "typer", "torch._dynamo")
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
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    import platform

    print(
        f"machine: cpu={cpu_model()}, cores={os.cpu_count()}, python={platform.python_version()}, "
        f"interpreter={sys.executable}, load_average_at_start="
        f"{[round(x, 2) for x in os.getloadavg()]}"
    )
    results: dict[str, object] = {}

    print(f"\nhelp: {args.runs} fresh runs each; wall seconds median (min-max); target <= 0.3 s")
    print(f"{'command':<32} {'seconds':>22}  torch  matplotlib")
    run_once(["--help"])  # warm the file cache once
    for argv in (["--help"], *([c, "--help"] for c in COMMANDS)):
        runs = [run_once(argv) for _ in range(args.runs)]
        secs = [r.seconds for r in runs]
        torch_in = any(r.modules.get("torch") for r in runs)
        mpl_in = any(r.modules.get("matplotlib") for r in runs)
        label = "mtx " + " ".join(argv)
        ok = "ok" if statistics.median(secs) <= 0.3 and not torch_in and not mpl_in else "MISS"
        print(f"{label:<32} {summary(secs):>22}  {str(torch_in):<5}  {str(mpl_in):<5}  {ok}")
        results[label] = {"seconds": secs, "torch": torch_in, "matplotlib": mpl_in}

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

    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
