"""Do two exports of the same study hold the same runs? Compare two ``runs.csv``
(``art-study report STUDY --export DIR``) run by run (``run_key``, or ``--by sequence,depth,seed``
when the code that made the keys changed): the columns the newer one added, any it lost, and
every value that differs, wall times, the code's commit and whether a stage came from the
cache aside (they differ between any two executions).

    python benchmarks/compare_runs.py results/paper/runs.csv /tmp/paper-again/runs.csv

Exit status 0 when nothing was lost and no value differs; 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

#: Column names (or their ends) that change between two executions of the same runs: wall
#: times, identities, and whether a stage was trained or taken from the cache (a resumed study
#: finds stages its stopped run had trained).
VOLATILE_ENDS = ("time_s", "images_per_s", "run_id", "git_commit", "mlflow.source.git.commit",
                 "/cached")


def volatile(column: str) -> bool:
    """Whether ``column`` is a wall time, a throughput or an identity of the execution."""
    return column.endswith(VOLATILE_ENDS)


def differences(old: pd.DataFrame, new: pd.DataFrame, by: list[str] | None = None
                ) -> tuple[list[str], list[str], list[str]]:
    """Columns added, columns lost, and one line per (run, column) whose value differs; runs
    matched by ``by`` (default: ``run_key``)."""
    by = by or ["run_key"]
    added = sorted(set(new.columns) - set(old.columns))
    lost = sorted(set(old.columns) - set(new.columns))
    a, b = old.set_index(by), new.set_index(by)
    lines = [f"run {k}: only in the first export" for k in sorted(set(a.index) - set(b.index))]
    lines += [f"run {k}: only in the second export" for k in sorted(set(b.index) - set(a.index))]
    for key in sorted(set(a.index) & set(b.index)):
        for column in sorted(set(a.columns) & set(b.columns)):
            x, y = a.at[key, column], b.at[key, column]
            if volatile(column) or (pd.isna(x) and pd.isna(y)):
                continue
            same = (np.isclose(x, y, rtol=0, atol=0) if isinstance(x, float | int)
                    and isinstance(y, float | int) else str(x) == str(y))
            if not same:
                lines.append(f"run {key}: {column}: {x!r} != {y!r}")
    return added, lost, lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", help="runs.csv of the reference export")
    p.add_argument("second", help="runs.csv of the export to check")
    p.add_argument("--by", default="run_key",
                   help="columns that identify a run, comma-separated (default: run_key)")
    args = p.parse_args()
    old, new = pd.read_csv(args.first), pd.read_csv(args.second)
    added, lost, lines = differences(old, new, args.by.split(","))
    compared = len(set(old.columns) & set(new.columns))
    print(f"{len(old)} / {len(new)} runs; {compared} common columns compared "
          f"({sum(volatile(c) for c in set(old.columns) & set(new.columns))} volatile skipped)")
    print(f"added columns: {', '.join(added) or 'none'}")
    print(f"lost columns: {', '.join(lost) or 'none'}")
    print("\n".join(lines) if lines else "every other value identical")
    return 1 if lost or lines else 0


if __name__ == "__main__":
    sys.exit(main())
