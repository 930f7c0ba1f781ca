"""Reading raw data sets for conversion: image folders (CelebA), MNIST idx files, the built-in digits.

Images are preprocessed once, at conversion time, with the CelebA recipe: a centered square crop
(`crop` pixels, default the shorter side) and an antialiased resize to the training resolution.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def center_crop_resize(image: Image.Image, resolution: int, crop: int = 0) -> Image.Image:
    """Centered square crop of side `crop` (0 = the shorter side), then resize to resolution^2."""
    width, height = image.size
    side = min(width, height) if crop <= 0 else min(crop, width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((resolution, resolution), Image.Resampling.LANCZOS)


def to_chw(image: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def list_images(folder: Path) -> list[Path]:
    """Every image file under `folder`, recursively, in a stable (sorted) order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image_file(path: Path, resolution: int, channels: int, crop: int) -> np.ndarray:
    """One image file -> preprocessed uint8 (C, R, R); raises on unreadable files."""
    with Image.open(path) as image:
        return to_chw(center_crop_resize(image.convert("RGB"), resolution, crop), channels)


def read_idx(path: Path) -> np.ndarray:
    """An MNIST idx file (.gz or not) -> uint8 array: (N, 28, 28) for images, (N,) for labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def find_mnist(source: Path, split: str = "train") -> tuple[Path, Path]:
    """The image and label idx files of a split inside `source` (MNIST's original file names)."""
    stems = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }[split]
    found = []
    for stem in stems:
        candidates = [source / stem, source / f"{stem}.gz", source / stem.replace("-idx", ".idx")]
        match = next((c for c in candidates if c.is_file()), None)
        if match is None:
            raise FileNotFoundError(f"{source}: no {stem}[.gz] (expected MNIST's idx files)")
        found.append(match)
    return found[0], found[1]


def resize_array(image: np.ndarray, resolution: int, crop: int = 0) -> np.ndarray:
    """A grey uint8 (H, W) array -> preprocessed uint8 (1, R, R)."""
    return to_chw(center_crop_resize(Image.fromarray(image), resolution, crop), 1)
