"""How images are stored inside shards, and the manifest that describes a shard directory.

Three formats (chosen with `dcgan shards --format`):
- `blocks` (default): each tar member holds a block of a few hundred pre-decoded uint8 images
  (`images.npy`, N x C x H x W) and their labels. Reading a block is a memcpy, so one worker delivers
  tens of thousands of images per second; per-sample decoding tops out near 3k/s per core (docs/performance.md).
- `png`: one lossless PNG per sample (pixel-exact, ~2/3 of the raw size, slow to decode).
- `jpeg`: one JPEG (quality 95) per sample (smallest, lossy, faster than PNG to decode).
Keys are zero-padded indices with no dots (webdataset splits a member name at its first dot).
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from dcgan.files import write_text_atomically

Format = Literal["blocks", "png", "jpeg"]
FORMATS: tuple[str, ...] = ("blocks", "png", "jpeg")
MANIFEST = "manifest.json"
JPEG_QUALITY = 95


class CorruptSample(ValueError):
    """A sample that cannot be decoded into an image of the expected shape (counted and skipped)."""


@dataclass
class ShardInfo:
    name: str
    samples: int


@dataclass
class Manifest:
    """What `dcgan shards` wrote: the loader reads shapes, format and per-shard counts from here."""

    format: str
    resolution: int
    channels: int
    source: str
    kind: str
    block_size: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    skipped_inputs: int = 0
    permutation_seed: int | None = None
    """The seed of the permutation the images were written in; None: the source's order (and every
    manifest written before the permutation existed)."""

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def write(self, out_dir: Path) -> None:
        write_text_atomically(
            out_dir / MANIFEST, json.dumps({**asdict(self), "total_samples": self.total_samples}, indent=1)
        )

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.parse(path.read_text())

    @classmethod
    def parse(cls, text: str | bytes) -> Manifest:
        """A manifest from its JSON text (read from a file, or fetched from a shard server)."""
        data = json.loads(text)
        data.pop("total_samples", None)
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        return cls(**data)


CHECKSUM = "crc32"
"""Member holding the CRC-32 of a sample's image payload (a block's images.npy, or the PNG/JPEG bytes).
Flipped bits inside pixel data decode without complaint (a block is raw bytes; JPEG tolerates damage),
so only a checksum notices them; zlib's CRC-32 costs ~3.5 us per 64x64 RGB image here, about a tenth of a
worker's time per image. Shards written before checksums existed are read without the check."""


def checksum(data: bytes) -> bytes:
    return f"{zlib.crc32(data):08x}".encode()


def verify_checksum(sample: dict[str, object], payload: str) -> None:
    """Raise CorruptSample when the sample carries a checksum that its payload does not match."""
    stored = sample.get(CHECKSUM)
    data = sample.get(payload)
    if isinstance(stored, bytes) and isinstance(data, bytes) and stored.strip() != checksum(data):
        raise CorruptSample(f"{payload} fails its CRC-32 check (damaged on disk or in transfer)")


def encode_image(image: np.ndarray, fmt: str) -> tuple[str, bytes]:
    """uint8 (C, H, W) -> (member extension, bytes) for the per-sample formats."""
    pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    buffer = io.BytesIO()
    if fmt == "png":
        pil.save(buffer, format="PNG", compress_level=1)
        return "png", buffer.getvalue()
    pil.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: no chroma blur
    return "jpg", buffer.getvalue()


def encode_block(images: np.ndarray, labels: np.ndarray) -> dict[str, bytes]:
    """A block of uint8 (N, C, H, W) images as `.npy` members (np.load reads them back with no decode)."""
    members = {}
    for name, array in (("images.npy", images), ("labels.npy", labels.astype(np.int16))):
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        members[name] = buffer.getvalue()
    members[CHECKSUM] = checksum(members["images.npy"])
    return members


def decode_image(data: bytes, channels: int, resolution: int) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> uint8 (C, H, W); anything else raises CorruptSample."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            array = np.asarray(pil.convert("L" if channels == 1 else "RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise CorruptSample(f"undecodable image ({type(exc).__name__})") from None
    if array.shape[:2] != (resolution, resolution):
        raise CorruptSample(f"image is {array.shape[1]}x{array.shape[0]}, expected {resolution}x{resolution}")
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode_block(data: bytes, channels: int, resolution: int) -> np.ndarray:
    """`images.npy` bytes -> uint8 (N, C, H, W), checked against the manifest's shape."""
    try:
        block = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises many types for bad bytes
        raise CorruptSample(f"unreadable block ({type(exc).__name__})") from None
    if block.dtype != np.uint8 or block.ndim != 4 or block.shape[1:] != (channels, resolution, resolution):
        raise CorruptSample(
            f"block of shape {block.shape} {block.dtype}, expected (N, {channels}, {resolution}, {resolution}) uint8"
        )
    return block


READ_BUFFER = 1 << 20
"""Bytes buffered between a shard's file or socket and tarfile. webdataset opens local shards with
open(path, buffering=$GOPEN_BUFFER), read when each shard is opened;
with the default 8 KiB buffer, tarfile's 10 KiB stream reads turn every 3 MB block into hundreds of system
calls. 1 MiB raised the raw tar rate from ~50k to ~90k img/s (64x64 RGB blocks, docs/performance.md)."""


IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
