"""Read back what an offline wandb run recorded (tests only).

wandb >= 0.20 no longer ships a Python reader for its `.wandb` files, so this reads the format directly:
a 7-byte header (":W&B", version), then LevelDB-log records in 32 KiB blocks (crc 4 bytes, length 2,
type 1: FULL/FIRST/MIDDLE/LAST), each record one serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
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


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The logged rows of an offline run directory (wandb/offline-run-*), in order."""
    (wandb_file,) = run_dir.glob("run-*.wandb")
    rows = []
    for record in records(wandb_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def run_id(run_dir: Path) -> str:
    (wandb_file,) = run_dir.glob("run-*.wandb")
    for record in records(wandb_file):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise AssertionError("no run record")
