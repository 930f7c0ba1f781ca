"""Reading `dcgan doctor`'s table back, for the tests of the doctor on one host and on several."""

from __future__ import annotations

import re
from pathlib import Path

QUICK = ("--seconds", "1", "--write-mib", "4")
"""Short measurements: a second each, 4 MiB written a rank."""


ROW = re.compile(
    r"^\s*(?P<rank>\d+)\s+(?P<host>\S+)\s+(?P<device>cpu)\s+(?P<threads>\d+)\s+(?P<cpus>\d+)\s+(?P<step>[\d-]+)\s+"
    r"(?P<ratio>[\d.]+x|-)\s+(?P<loader>[\d-]+)\s+(?P<write>[\d-]+)\s+(?P<status>.+)$",
    re.MULTILINE,
)


def rows(text: str) -> dict[int, dict[str, str]]:
    """The doctor's table, by rank."""
    return {int(m["rank"]): m.groupdict() for m in ROW.finditer(text)}


def leftovers(directory: Path) -> list[Path]:
    return list(directory.glob(".dcgan-doctor-*"))
