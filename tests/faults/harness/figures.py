"""The figures table: one line per fault-plan row, printed at the end and saved as JSON.

A row test is marked ``@pytest.mark.row(3, "partition (drop) of a device's link")``
and fills the ``figures`` fixture (a dict) with what it measured:
``figures.update(lost=0, dups=0, inversions=0, detect_s=7.4)``. Pass or fail
comes from the test's own outcome. ``conftest.py`` collects the entries and
calls ``format_table`` / ``write_json``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

# Shown first, in this order, when present; everything else follows as key=value.
LEAD = ("lost", "dups", "db_dups", "inversions")


def entry(row: int | str, name: str, nodeid: str, outcome: str, duration_s: float, figures: dict) -> dict:
    """One table entry."""
    return {"row": row, "name": name, "test": nodeid, "outcome": outcome,
            "duration_s": round(duration_s, 2), "figures": dict(figures)}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return f"[{len(value)} items]"
    return str(value)


def _sort_key(e: dict) -> tuple:
    row = e["row"]  # numbered rows first, then named groups; run order within a row
    return (0, row, "") if isinstance(row, int) else (1, 0, str(row))


def format_table(entries: list[dict]) -> list[str]:
    """Lines of the table, sorted by row number."""
    lines = [f"{'row':>6}  {'result':<6}  {'time':>6}  {'test':<44}  figures"]
    for e in sorted(entries, key=_sort_key):
        figs = e["figures"]
        keys = [k for k in LEAD if k in figs] + [k for k in figs if k not in LEAD]
        text = " ".join(f"{k}={_fmt(figs[k])}" for k in keys)
        label = e["name"] if len(e["name"]) <= 44 else e["name"][:43] + "~"
        result = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}.get(e["outcome"], e["outcome"].upper())
        lines.append(f"{e['row']!s:>6}  {result:<6}  {e['duration_s']:>5.1f}s  {label:<44}  {text}")
    return lines


def machine() -> dict:
    """Where the figures were measured."""
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 0.0
    return {"cpus": os.cpu_count(), "memory_gb": round(mem_gb, 1), "kernel": platform.release(),
            "python": platform.python_version(), "machine": platform.machine()}


def write_json(path: str | Path, entries: list[dict], long_run: bool) -> Path:
    """Save the entries with the date, the machine and whether it was a --long run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "long": long_run, "machine": machine(),
           "rows": sorted(entries, key=_sort_key)}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path
