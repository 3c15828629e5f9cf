"""Reading a device inventory (CSV) for ``lepton provision bulk``.

A header row is required. Column ``id`` is the device id; optional ``tags``
holds tags separated by ``;`` or spaces. Other columns (serial number,
location, ...) are allowed and ignored. Blank rows and rows whose first cell
starts with ``#`` are skipped.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from lepton.errors import ConfigError
from lepton.provisioning.fleet import device_name


def read_inventory(path: Path) -> list[tuple[str, list[str]]]:
    """(device id, tags) per row; ConfigError naming the file and line of a bad row."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read inventory {path}: {getattr(exc, 'strerror', None) or exc}") from None
    rows = [(n, r) for n, r in enumerate(rows, 1) if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not rows:
        raise ConfigError(f"inventory {path} is empty (expected a header row with an 'id' column)")
    _, header = rows[0]
    columns = [c.strip().lower() for c in header]
    if "id" not in columns:
        raise ConfigError(f"inventory {path}: the header row has no 'id' column (found: {', '.join(columns)})")
    id_col = columns.index("id")
    tag_col = columns.index("tags") if "tags" in columns else None
    out = []
    for line, row in rows[1:]:
        cell = row[id_col].strip() if id_col < len(row) else ""
        try:
            device = device_name(cell)
        except ConfigError as exc:
            raise ConfigError(f"inventory {path} line {line}: {exc}") from None
        tags = row[tag_col] if tag_col is not None and tag_col < len(row) else ""
        out.append((device, [t for t in re.split(r"[;\s]+", tags) if t]))
    return out
