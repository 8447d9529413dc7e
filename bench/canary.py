"""How well the canary judge decides: `python bench/canary.py [--runs 1000] [--scenario KEY] [--processes 2]`.

Each case of issue 14's proof (`tests/canary_sim.CASES`: a seeded simulator driving the real heartbeat path,
`dashboard.rollout.signals.Increments`, and the real `dashboard.rollout.judge.Judge`) is run `--runs` times on
seeds from `BENCH_FIRST_SEED` on (the default test run uses others). Per case it prints the share of runs rolled
back, the share that meets the requirement's time limit beside the requirement (the reference of this benchmark),
the median and 95th percentile time to rollback (of the runs rolled back), the share that reached "pass" and the
median time to it (over all runs: "> horizon" when under half did), and the judge's design error rates
(`alpha`: rolling back a canary as good as the primary; `beta`: promoting one twice as bad on a component).
The process exits 1 if a requirement is not met.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # `tests.canary_sim`

import numpy as np  # noqa: E402

from tests.canary_sim import BENCH_FIRST_SEED, CASES, Case, run  # noqa: E402

CHUNK = 50  # seeds per task: small enough to keep both cores busy to the end


Result = tuple[float | None, float | None]  # (first harm, first pass), seconds from the start


def _chunk(task: tuple[str, int, int]) -> tuple[float, list[Result]]:
    """Runs seeds `first` to `first + count` of one case in a worker; its CPU seconds and the results."""
    key, first, count = task
    case = next(case for case in CASES if case.key == key)
    start = time.process_time()
    outcomes = [run(case.scenario, seed, case.criteria) for seed in range(first, first + count)]
    return time.process_time() - start, [(outcome.harm_at, outcome.pass_at) for outcome in outcomes]


def _quantile(values: list[float], q: float) -> str:
    return f"{float(np.quantile(values, q)):.0f} s" if values else "-"


def report(case: Case, results: list[Result], seconds: float) -> tuple[list[str], bool]:
    runs = len(results)
    harms = [harm for harm, _ in results if harm is not None]
    # Time to pass over all runs, never passing as infinite: the median is "more than the horizon" if under half pass.
    passes = [math.inf if passed is None else passed for _, passed in results]
    pass_median = float(np.median(passes))
    within = case.requirement.within
    counted = sum(1 for harm in harms if within is None or harm <= within) / runs
    met = case.requirement.met(counted)
    criteria = case.criteria
    row = [
        case.key,
        f"{runs:,}",
        f"{100 * len(harms) / runs:.1f} %",
        f"{100 * counted:.1f} %",
        case.requirement.text(),
        "yes" if met else "NO",
        _quantile(harms, 0.5),
        _quantile(harms, 0.95),
        f"{100 * sum(math.isfinite(t) for t in passes) / runs:.1f} %",
        f"{pass_median:.0f} s" if math.isfinite(pass_median) else f"> {case.scenario.horizon:.0f} s",
        f"{criteria.alpha:g} / {criteria.beta:g}",
        f"{seconds:.0f} s",
    ]
    return row, met


HEADER = [
    "case",
    "runs",
    "rolled back",
    "within target",
    "requirement",
    "met",
    "rollback p50",
    "rollback p95",
    "passed",
    "pass p50",
    "alpha / beta",
    "cpu",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000, help="rollouts per case (default 1000)")
    parser.add_argument("--scenario", choices=[case.key for case in CASES], action="append", help="only these")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=BENCH_FIRST_SEED)
    args = parser.parse_args(argv)
    cases = [case for case in CASES if not args.scenario or case.key in args.scenario]
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    all_met = True
    with Pool(args.processes) as pool:
        for case in cases:
            tasks = [
                (case.key, first, min(CHUNK, args.first_seed + args.runs - first))
                for first in range(args.first_seed, args.first_seed + args.runs, CHUNK)
            ]
            chunks = pool.map(_chunk, tasks)
            results = [result for _, chunk in chunks for result in chunk]
            cpu = sum(seconds for seconds, _ in chunks)
            row, met = report(case, results, cpu)
            all_met = all_met and met
            print("| " + " | ".join(row) + " |", flush=True)
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
