"""Print the figures a ``make bench`` run wrote, side by side when given several runs.

    .venv/bin/python docs/examples/bench_table.py bench/results/reference-2026-12-02.json
    .venv/bin/python docs/examples/bench_table.py OLD.json NEW.json   # last column: NEW / OLD

Each file is one run's JSON (``bench/results/latest.json`` after ``make bench``); its ``table``
holds every figure with its unit, target and PASS / FAIL, and its ``meta`` the commit, the
machine's CPU count and load, and how much other processes took from the run.
"""

import json
import sys
from pathlib import Path
from typing import Any


def load(path: str) -> dict[str, Any]:
    run: dict[str, Any] = json.loads(Path(path).read_text())
    return run


def keyed(table: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    seen: dict[str, int] = {}
    out = {}
    for row in table:
        seen[row["figure"]] = seen.get(row["figure"], 0) + 1
        out[(row["figure"], seen[row["figure"]])] = row
    return out


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    runs = [load(path) for path in paths]
    for path, run in zip(paths, runs, strict=True):
        meta = run.get("meta", {})
        print(
            f"# {path}: commit {meta.get('revision', '?')}, {meta.get('cpus', '?')} CPUs, "
            f"{'quick' if meta.get('quick') else 'full'} run started {meta.get('started_at', '?')}"
        )
    # A figure is its name and which occurrence of that name it is (sub-rows such as
    # "  max at 10%" repeat under each heading row).
    values = [keyed(run["table"]) for run in runs]
    figures = list(dict.fromkeys(key for table in values for key in table))
    width = max(len(name) for name, _ in figures)
    for key in figures:
        name = key[0]
        rows = [table.get(key) for table in values]
        cells = [f"{row['value']:>12.4g}" if row else f"{'-':>12}" for row in rows]
        known = next(row for row in rows if row)
        line = f"{name:<{width}}  {' '.join(cells)}  {known['unit']:<7}"
        first, last = rows[0], rows[-1]
        if len(rows) > 1 and first and last and first["value"]:
            line += f"  {last['value'] / first['value']:6.2f} x"
        elif len(rows) == 1 and known["target"]:
            line += f"  {known['target']:>10} {known['result']}"
        print(line.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
