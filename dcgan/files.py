"""Writing a file so that a reader, or a process killed mid-write, finds the old whole file or the new
whole file, never part of one: the content goes to a hidden temporary name beside the file, which is then
renamed over it (a rename is atomic within one file system). Every file the project rewrites in place
(manifests, stats.jsonl, the attempt count, the best checkpoint's record, cached features, the
recipe arm's generator, shards, configs, compare.json) is written this way."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends without an
    error, removed when it raises. The name is hidden and ends in .tmp (with the writer's pid, so that two
    writers never share one), so that a leftover never matches a shard pattern or a glob of results."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """`path.write_text(text)`, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
