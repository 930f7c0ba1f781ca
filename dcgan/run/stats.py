"""stats.jsonl, read back: the metric lines of a run (a line still being written is skipped), and the
rewind to a checkpoint's step when a run resumes, so that no step appears twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcgan.files import write_text_atomically


def read_stats(path: Path) -> list[dict[str, Any]]:
    """stats.jsonl as dicts, one per line; a line that does not parse (torn by a kill, or being written
    right now by a running job) is skipped. The one reader of the file."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def rewind_stats(path: Path, step: int) -> int:
    """Drop the stats.jsonl lines of steps after `step` (and lines torn by a kill); return how many
    lines were dropped.

    A run killed between two checkpoints resumes from the older one and logs those steps again; keeping
    one line per step keeps the file a single history (what plots and `jq` users expect). The file is
    replaced atomically; kept lines are written back as they were logged (json.dumps of the same dict).
    """
    if not path.is_file():
        return 0
    lines = len(path.read_text().splitlines())
    kept = [row for row in read_stats(path) if row["step"] <= step]
    if len(kept) == lines:
        return 0
    write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in kept))
    return lines - len(kept)
