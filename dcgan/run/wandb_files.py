"""Read back what an offline wandb run recorded: the steps a requeued run already logged, and tests.

Every requeue of an offline run writes another `wandb/offline-run-*` segment with the same run id. A
segment resumed from a checkpoint older than the last logged step would log the steps in between a
second time; `logged_steps` tells the new segment which steps the earlier ones hold, so that the
segments together log every step once and `dcgan sync` can upload them as one history.

wandb >= 0.20 no longer ships a Python reader for its `.wandb` files, so this reads the format directly:
a 7-byte header (":W&B", version), then LevelDB-log records in 32 KiB blocks (crc 4 bytes, length 2,
type 1: FULL/FIRST/MIDDLE/LAST), each record one serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb datastore file"
    out, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer too small for a record header: zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _rows(found: list[Any]) -> list[dict[str, Any]]:
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in found
        if record.WhichOneof("record_type") == "history"
    ]


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The logged rows of an offline run directory (wandb/offline-run-*), in order."""
    (wandb_file,) = run_dir.glob("run-*.wandb")
    return _rows(records(wandb_file))


def segments(run_dir: Path) -> list[Path]:
    """The offline segments of a run directory, oldest first (their names start with a timestamp)."""
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@dataclass(frozen=True)
class Segment:
    """An offline segment that `wandb sync` can upload: its directory, run id and logged steps."""

    path: Path
    run_id: str
    steps: list[int]


def uploadable_segments(run_dir: Path) -> list[Segment]:
    """The segments of a run directory that hold a run record, oldest first, each file read once. A kill
    can leave a segment without one (nothing wandb could upload); such segments are left out."""
    found = []
    for path in segments(run_dir):
        files = list(path.glob("run-*.wandb"))
        if len(files) != 1:
            continue
        try:
            parsed = records(files[0])
            steps = [int(row["_step"]) for row in _rows(parsed)]
        except (AssertionError, ValueError, KeyError, struct.error, ImportError):
            continue
        ids = [r.run.run_id for r in parsed if r.WhichOneof("record_type") == "run"]
        if ids:
            found.append(Segment(path, ids[0], steps))
    return found


def run_id(run_dir: Path) -> str:
    (wandb_file,) = run_dir.glob("run-*.wandb")
    for record in records(wandb_file):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise AssertionError("no run record")
