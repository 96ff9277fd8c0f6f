"""What `bigmodel report` costs on a finished run, against the evaluation it builds on, in one process.

For the run given (default: trains `recipes/quickstart.yaml` first; the README figure is the 36-epoch
`recipes/fashion_mnist_resnet.yaml` run), it times, median of `--rounds`:
- `evaluate`: the plain final evaluation of the split (`bigmodel.api.evaluate`), the baseline;
- the report from the run's files alone (`--no-inference`);
- the full report (one inference pass with per-example outputs kept: calibration and the highest-loss gallery);
and prints the environment, a table and the page size. `--json` prints one object with `report_files_s`,
`report_full_s`, `evaluate_s`, `report_vs_evaluate_ratio` (full report / evaluate) and `report_bytes`.

    python benchmarks/report.py [RUN_DIR] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, median, print_env, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="a finished run directory (default: train the quickstart first)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from bigmodel import api
    from bigmodel.config import load_recipe
    from bigmodel.report import build_report

    if args.run is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
        run = api.train(load_recipe(ROOT / "recipes" / "quickstart.yaml"), out=tmp / "run", progress=False).run_dir
    else:
        run = Path(args.run)
    build_report([run], inference=False)  # warm-up: imports, matplotlib's font cache

    timings: dict[str, list[float]] = {"evaluate": [], "files": [], "full": []}
    size = 0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        api.evaluate(run, decode=False)
        timings["evaluate"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        build_report([run], inference=False)
        timings["files"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rep = build_report([run])
        timings["full"].append(time.perf_counter() - t0)
        size = len(rep.html.encode())
    ev, files, full = (median(timings[k]) for k in ("evaluate", "files", "full"))
    out = {
        "run": str(run),
        "rounds": args.rounds,
        "evaluate_s": round(ev, 3),
        "report_files_s": round(files, 3),
        "report_full_s": round(full, 3),
        "report_vs_evaluate_ratio": round(full / ev, 3),
        "report_bytes": size,
        "env": environment(),
    }
    if args.json:
        emit_json(out)
        return
    print_env(out["env"])
    print(f"run: {run}  (median of {args.rounds} rounds, one process)")
    print_table(
        ["what", "seconds"],
        [
            ["evaluate (baseline)", ev],
            ["report from files (--no-inference)", files],
            ["report with inference", full],
            ["report / evaluate ratio", full / ev],
        ],
    )
    print(f"report size: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
