"""WebDataset shards on real tar files: writing, reading, splitting, resampling, bad data."""

from __future__ import annotations

import gzip
import io
import itertools
import shutil
import struct
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    ROOT,
    checkpoint_complete,
    image_index,
    indexed_image,
    run_in_process,
    subprocess_env,
    tiny_config,
    write_image_folder,
)
from PIL import Image

from dcgan.config import ConfigError
from dcgan.data.digits import digits_images
from dcgan.data.formats import Manifest
from dcgan.data.inputs import center_crop_resize, read_idx
from dcgan.data.offline import read_images
from dcgan.data.stream import ShardSource
from dcgan.data.writer import write_shards, written_order
from dcgan.distributed.env import DistInfo
from dcgan.errors import ShardError


def rank_info(rank: int, world: int) -> DistInfo:
    return DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


def source_for(shards: Path, tmp: Path, rank: int = 0, world: int = 1, *overrides: str) -> ShardSource:
    manifest = Manifest.read(shards / "manifest.json")
    config = tiny_config(
        tmp,
        f"data.shards={shards}",
        f"model.resolution={manifest.resolution}",
        f"model.channels={manifest.channels}",
        *overrides,
    )
    return ShardSource(config, rank_info(rank, world), pin_memory=False)


def take(source: ShardSource, n: int, close: bool = True) -> list[torch.Tensor]:
    """The next n batches (a fresh iterator continues from the source's position); then stop workers."""
    stream = iter(source)
    batches = [next(stream) for _ in range(n)]
    if close:
        source.close()
    return batches


@pytest.mark.parametrize("fmt", ["blocks", "png"])
def test_lossless_formats_round_trip_pixel_exact(fmt: str, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / fmt
    manifest = write_shards(
        "folder", image_folder, out, fmt=fmt, resolution=16, shard_size=20, block_size=8, workers=2, progress=False
    )
    assert manifest.total_samples == 80 and [s.samples for s in manifest.shards] == [20, 20, 20, 20]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard-{i:06d}.tar" for i in range(4)]
    source = source_for(out, tmp_path, 0, 1, "data.resampled=false", "train.batch_size=10", "data.workers=0")
    images = torch.cat(take(source, source.batches_per_epoch)).numpy()
    assert len(images) == 80
    for image in images:
        expected = indexed_image(image_index(image), 16).transpose(2, 0, 1)
        assert np.array_equal(image, expected)


def test_jpeg_shards_decode_close_to_the_originals(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "jpg"
    manifest = write_shards(
        "folder",
        image_folder,
        out,
        fmt="jpeg",
        resolution=16,
        shard_size=40,
        workers=1,
        progress=False,
        permutation_seed=None,
    )
    assert manifest.format == "jpeg" and manifest.permutation_seed is None
    source = source_for(out, tmp_path, 0, 1, "data.resampled=false", "train.batch_size=10", "data.workers=0")
    order = [int(p.stem) for p in sorted(image_folder.rglob("*.png"))]  # keys follow the sorted file list
    originals = [indexed_image(i, 16).transpose(2, 0, 1).astype(float) for i in order]
    errors = [np.abs(im.astype(float) - originals[k]).mean() for k, im in enumerate(sorted_by_key(out))]
    assert len(torch.cat(take(source, source.batches_per_epoch))) == 80
    assert 0 < max(errors) < 12  # lossy (random-noise images are JPEG's worst case), but close


def sorted_by_key(shards: Path) -> list[np.ndarray]:
    """Decode every JPEG member in key order, straight from the tar files."""
    images = []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.name.endswith(".jpg"):
                    images.append(np.asarray(Image.open(tar.extractfile(member)).convert("RGB")).transpose(2, 0, 1))
    return images


def make_indexed_blocks(tmp_path: Path, count: int, shard_size: int) -> Path:
    folder = tmp_path / "folder"
    write_image_folder(folder, count, 16)
    out = tmp_path / "shards"
    write_shards(
        "folder",
        folder,
        out,
        fmt="blocks",
        resolution=16,
        shard_size=shard_size,
        block_size=5,
        workers=1,
        progress=False,
    )
    return out


def epoch_indices(source: ShardSource) -> list[int]:
    batches = take(source, source.batches_per_epoch)
    return [image_index(im) for im in torch.cat(batches).numpy()]


@pytest.mark.slow
def test_exact_mode_sees_every_sample_once_across_two_ranks_and_two_workers(tmp_path: Path) -> None:
    shards = make_indexed_blocks(tmp_path, 80, 10)  # 8 shards -> 2 per (rank, worker)
    seen: list[int] = []
    per_rank = []
    for rank in (0, 1):
        source = source_for(shards, tmp_path, rank, 2, "data.resampled=false", "data.workers=2", "train.batch_size=5")
        indices = epoch_indices(source)
        per_rank.append(set(indices))
        seen += indices
    assert sorted(seen) == list(range(80))
    assert not per_rank[0] & per_rank[1]
    again = source_for(shards, tmp_path, 0, 2, "data.resampled=false", "data.workers=2", "train.batch_size=5")
    stream = iter(again)
    first = [image_index(im) for _ in range(again.batches_per_epoch) for im in next(stream).numpy()]
    second = [image_index(im) for _ in range(again.batches_per_epoch) for im in next(stream).numpy()]
    again.close()
    assert first != second and sorted(first) != sorted(seen)  # reshuffled next epoch, still one rank's half
    assert len(set(second)) == len(second) == 40


@pytest.mark.slow
def test_resampled_mode_gives_every_rank_the_same_number_of_full_batches(tmp_path: Path) -> None:
    shards = make_indexed_blocks(tmp_path, 70, 30)  # uneven shards: 30, 30, 10
    counts = []
    for rank in range(3):
        source = source_for(shards, tmp_path, rank, 3, "data.workers=2", "train.batch_size=4")
        batches = take(source, 3 * source.batches_per_epoch)
        assert all(b.shape == (4, 3, 16, 16) and b.dtype == torch.uint8 for b in batches)
        counts.append(source.batches_per_epoch)
        assert source.state_dict() == {"epoch": 3, "batch": 0}
    assert counts == [70 // 3 // 4] * 3


def test_resampled_mode_reads_every_shard_once_an_epoch_then_deals_them_again(tmp_path: Path) -> None:
    """8 shards of 10 images, 2 partitions, no shuffle window: each epoch of the endless stream is one deal
    of all the shards, so every image comes exactly once; the next epoch deals them anew. Eight draws
    with replacement from 8 shards would leave about three of them unread."""
    shards = make_indexed_blocks(tmp_path, 80, 10)
    args = ("data.workers=0", "data.partitions=2", "train.batch_size=10", "data.shuffle_buffer=1")
    source = source_for(shards, tmp_path, 0, 1, *args)
    assert source.batches_per_epoch == 8
    images = [image_index(im) for batch in take(source, 16) for im in batch.numpy()]
    first, second = images[:80], images[80:]
    assert sorted(first) == sorted(second) == list(range(80))
    assert first != second


@pytest.mark.slow
def test_stream_is_deterministic_and_differs_by_rank(tmp_path: Path) -> None:
    shards = make_indexed_blocks(tmp_path, 60, 20)
    a = [b.clone() for b in take(source_for(shards, tmp_path, 0, 2, "data.workers=2", "train.batch_size=4"), 6)]
    b = take(source_for(shards, tmp_path, 0, 2, "data.workers=2", "train.batch_size=4"), 6)
    c = take(source_for(shards, tmp_path, 1, 2, "data.workers=2", "train.batch_size=4"), 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.slow
def test_resume_mid_epoch_replays_the_same_stream(tmp_path: Path, workers: int) -> None:
    shards = make_indexed_blocks(tmp_path, 60, 20)
    args = (f"data.workers={workers}", "train.batch_size=4", "data.shuffle_buffer=16")
    straight = take(source_for(shards, tmp_path, 1, 2, *args), 12)  # 60 // 2 // 4 = 7 per epoch: crosses one
    first = source_for(shards, tmp_path, 1, 2, *args)
    head = take(first, 5)
    resumed = source_for(shards, tmp_path, 1, 2, *args)
    resumed.load_state_dict(first.state_dict())
    tail = take(resumed, 7)
    assert all(torch.equal(x, y) for x, y in zip(straight, head + tail, strict=True))


def corrupt_one_png(shards: Path) -> int:
    """Replace the bytes of the third PNG in shard 0 with garbage (the tar stays valid); return its key."""
    path = shards / "shard-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    pngs = [m.name for m, _ in members if m.name.endswith(".png")]
    victim = pngs[2]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            if member.name == victim:
                data = b"\x89PNG not really"
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return int(victim.split(".")[0])


def test_corrupt_sample_is_skipped_and_counted(image_folder: Path, tmp_path: Path) -> None:
    shards = tmp_path / "png"
    write_shards("folder", image_folder, shards, fmt="png", resolution=16, shard_size=20, workers=1, progress=False)
    corrupt_one_png(shards)
    source = source_for(shards, tmp_path, 0, 1, "data.workers=2", "train.batch_size=4")
    images = torch.cat(take(source, 3 * source.batches_per_epoch)).numpy()
    # shard 0 is drawn several times in 3 epochs; each read of it skips the broken sample once
    assert source.skipped_samples >= 2
    assert len(images) == 3 * 80 and all(im.shape == (3, 16, 16) for im in images)


def test_exact_mode_with_a_corrupt_sample_fails_clearly(image_folder: Path, tmp_path: Path) -> None:
    shards = tmp_path / "png"
    write_shards("folder", image_folder, shards, fmt="png", resolution=16, shard_size=20, workers=1, progress=False)
    corrupt_one_png(shards)
    source = source_for(shards, tmp_path, 0, 1, "data.resampled=false", "data.workers=0", "train.batch_size=4")
    with pytest.raises(RuntimeError, match="fewer batches than it promised.*corrupt.*data.resampled=true"):
        take(source, source.batches_per_epoch)


def copied_shards(shards: Path, tmp_path: Path) -> Path:
    """A copy of a shard directory that a test may damage (the session's shards stay intact)."""
    return Path(shutil.copytree(shards, tmp_path / "copy"))


def test_missing_shard_names_itself(digits_shards: Path, tmp_path: Path) -> None:
    copy = copied_shards(digits_shards, tmp_path)
    (copy / "shard-000003.tar").unlink()
    with pytest.raises(ShardError, match="shard not found: .*shard-000003.tar"):
        source_for(copy, tmp_path)
    pattern = f"pipe:cat {tmp_path}/absent-{{0..1}}.tar"
    config = tiny_config(tmp_path, f"data.shards={pattern}", "data.epoch_samples=32", "data.workers=0")
    with pytest.raises(ShardError, match=r"cannot read shard \S*absent-[01]\.tar"):
        take(ShardSource(config, rank_info(0, 1)), 1)


def test_exact_mode_with_too_few_shards_fails_fast_with_the_fix(digits_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="8 shards cannot feed 16 partitions in exact mode.*data.resampled=true"):
        source_for(digits_shards, tmp_path, 0, 4, "data.resampled=false", "data.workers=4")


def test_shape_mismatch_is_refused(digits_shards: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, f"data.shards={digits_shards}", "model.resolution=32")
    with pytest.raises(ConfigError, match="model.resolution: the shards hold 16x16 images, config says 32"):
        ShardSource(config, rank_info(0, 1))


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_mnist_idx_files_parse_to_the_right_images_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=30, dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "train-labels-idx1-ubyte"), labels)
    out = tmp_path / "shards"
    manifest = write_shards("mnist", tmp_path, out, fmt="png", resolution=28, shard_size=30, workers=1, progress=False)
    assert (manifest.channels, manifest.total_samples, manifest.permutation_seed) == (1, 30, 0)
    order = written_order(30, 0)
    with tarfile.open(out / "shard-000000.tar") as tar:
        first = np.asarray(Image.open(tar.extractfile("000000000.png")))
        label = tar.extractfile("000000007.cls").read()
    assert np.array_equal(first, images[order[0]]) and int(label) == labels[order[7]]
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(bad)


def test_celeba_recipe_center_crops_then_resizes() -> None:
    rows = np.repeat(np.arange(218, dtype=np.uint8)[:, None], 178, axis=1)
    image = Image.fromarray(np.stack([rows] * 3, axis=-1))  # 178 wide, 218 high: CelebA aligned
    cropped = np.asarray(center_crop_resize(image, 178))
    assert cropped.shape == (178, 178, 3)
    assert cropped[0, 0, 0] == 20 and cropped[-1, 0, 0] == 197  # rows 20..197: the centered square
    small = np.asarray(center_crop_resize(image, 64))
    assert small.shape == (64, 64, 3) and abs(int(small[32, 32, 0]) - 109) <= 2


@pytest.mark.slow
def test_shards_cli_refuses_non_empty_out_dir_and_overwrites_when_asked(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_in_process(
        "shards", "folder", str(image_folder), str(out), "--resolution", "16", "--shard-size", "40", "--workers", "1"
    )
    assert "80 images in 2 shards" in result.stdout
    again = run_in_process("shards", "folder", str(image_folder), str(out), "--resolution", "16", check=False)
    assert again.returncode == 2 and "not empty; pass --overwrite" in again.stderr
    run_in_process(
        "shards",
        "folder",
        str(image_folder),
        str(out),
        "--resolution",
        "16",
        "--shard-size",
        "80",
        "--workers",
        "1",
        "--overwrite",
    )
    assert Manifest.read(out / "manifest.json").shards[0].samples == 80
    assert not (out / "shard-000001.tar").exists()


def shard_members(out: Path) -> list[list[int]]:
    """The image indices (indexed_image) each shard of `out` holds, in stored order."""
    counts = [s.samples for s in Manifest.read(out / "manifest.json").shards]
    images = read_images(str(out), 16, 3)
    indices = [image_index(images[p]) for p in sorted(images)]
    bounds = list(itertools.accumulate(counts, initial=0))
    return [indices[a:b] for a, b in itertools.pairwise(bounds)]


def test_shards_are_written_in_a_seeded_permutation_so_every_shard_samples_the_whole_folder(
    image_folder: Path, tmp_path: Path
) -> None:
    """The folder lists part0 (even indices) before part1 (odd), as a folder of class subfolders lists
    its classes: in that order half the shards would hold one "class" only."""
    listing = [int(p.stem) for p in sorted(image_folder.rglob("*.png"))]
    common = [str(image_folder), "--resolution", "16", "--shard-size", "20", "--workers", "1"]
    stored = tmp_path / "stored"
    result = run_in_process("shards", "folder", *common, str(stored), "--order", "stored")
    assert "in the source's order" in result.stdout
    assert [len({i % 2 for i in shard}) for shard in shard_members(stored)] == [1, 1, 1, 1]

    shuffled = tmp_path / "shuffled"
    result = run_in_process("shards", "folder", *common, str(shuffled))
    assert "shuffled (seed 0)" in result.stdout and Manifest.read(shuffled / "manifest.json").permutation_seed == 0
    members = shard_members(shuffled)
    assert [i for shard in members for i in shard] == [listing[k] for k in written_order(80, 0)]
    assert all(5 <= sum(i % 2 for i in shard) <= 15 for shard in members)  # both halves in every shard

    other = tmp_path / "seed1"
    run_in_process("shards", "folder", *common, str(other), "--seed", "1")
    assert sorted(i for shard in shard_members(other) for i in shard) == sorted(listing)
    assert shard_members(other) != members


def test_digits_shards_match_the_builtin_digits(digits_shards: Path, tmp_path: Path) -> None:
    source = source_for(digits_shards, tmp_path, 0, 1, "data.resampled=false", "train.batch_size=25")
    images = torch.cat(take(source, source.batches_per_epoch))
    reference = {bytes(im.numpy().tobytes()) for im in digits_images(16)}
    assert len(images) == 1775 and all(bytes(im.numpy().tobytes()) in reference for im in images)


@pytest.mark.slow
def test_training_from_shards_through_the_cli(digits_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_in_process(
        "train",
        "configs/tiny.yaml",
        f"run.dir={run}",
        f"data.shards={digits_shards}",
        "data.workers=2",
        "train.steps=10",
    )
    assert checkpoint_complete(run, 10)
    assert Counter(line.count('"step"') for line in (run / "stats.jsonl").read_text().splitlines()) == Counter({1: 2})


@pytest.mark.slow
def test_bench_data_prints_a_table_with_several_partitions_per_worker_against_one(digits_shards: Path) -> None:
    out = run_in_process(
        "bench", "data", str(digits_shards), "--workers", "0,1", "--batches", "5", "--batch-size", "16"
    ).stdout
    header, *lines = out.splitlines()
    assert header.split()[:4] == ["workers", "partitions", "img/s", "vs"] and "delivered to cpu" in header
    rows = [line.split() for line in lines]
    assert [(r[0], r[1]) for r in rows] == [("0", "1"), ("0", "4"), ("1", "1"), ("1", "4")]
    assert all(float(r[2]) > 0 for r in rows)
    assert [r[3] for r in rows[::2]] == ["1.00x", "1.00x"]
    for baseline, several in (rows[0:2], rows[2:4]):
        assert float(several[3].rstrip("x")) == pytest.approx(float(several[2]) / float(baseline[2]), abs=0.011)


def damage_tar_header(shard: Path, member_index: int) -> int:
    """Overwrite the checksum of one member's tar header (its data stays intact): Python's tarfile then
    stops reading the shard there, silently. Returns the images the shard still yields before it."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    victim = members[member_index]
    with open(shard, "r+b") as handle:
        handle.seek(victim.offset + 148)  # the header's chksum field
        handle.write(b"garbage!")
    blocks_before = len({m.name.split(".")[0] for m in members[:member_index] if m.name.endswith("images.npy")})
    return blocks_before


def test_a_damaged_tar_header_counts_the_rest_of_the_shard_as_skipped(
    digits_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = copied_shards(digits_shards, tmp_path)
    manifest = Manifest.read(copy / "manifest.json")
    expected = manifest.shards[0].samples
    with tarfile.open(copy / "shard-000000.tar") as tar:
        names = [m.name for m in tar.getmembers()]
    fourth_block = [i for i, name in enumerate(names) if name.endswith("images.npy")][3]
    blocks_before = damage_tar_header(copy / "shard-000000.tar", fourth_block)
    yielded = sum(len(b) for b in _blocks_of(copy / "shard-000000.tar", blocks_before))
    missing = expected - yielded
    assert 0 < missing < expected
    source = source_for(copy, tmp_path, 0, 1, "data.workers=0", "train.batch_size=32", "data.epoch_samples=3200")
    with caplog.at_level("WARNING"):
        take(source, 80)
    assert source.skipped_samples > 0 and source.skipped_samples % missing == 0  # each read of shard 0 counts it
    assert f"shard-000000.tar yielded {yielded} of its {expected} images: {missing} counted as skipped" in caplog.text


def _blocks_of(shard: Path, count: int) -> list[np.ndarray]:
    """The first `count` image blocks of an intact part of a shard, read directly with tarfile."""
    blocks = []
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith("images.npy") and len(blocks) < count:
                blocks.append(np.load(io.BytesIO(tar.extractfile(member).read())))
    return blocks


def test_flipped_pixels_in_a_block_fail_its_checksum_and_count_its_images(
    digits_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = copied_shards(digits_shards, tmp_path)
    shard = copy / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        second_block = [m for m in tar.getmembers() if m.name.endswith("images.npy")][1]
        images_in_block = len(np.load(io.BytesIO(tar.extractfile(second_block).read())))
    with open(shard, "r+b") as handle:  # pixel bytes only: the block still decodes to the right shape
        handle.seek(second_block.offset_data + second_block.size - 7)
        handle.write(b"\xff\x00\xff")
    source = source_for(copy, tmp_path, 0, 1, "data.workers=0", "train.batch_size=32", "data.epoch_samples=3200")
    with caplog.at_level("WARNING"):
        take(source, 80)
    assert source.skipped_samples > 0 and source.skipped_samples % images_in_block == 0
    assert "images.npy fails its CRC-32 check" in caplog.text


def test_the_read_buffer_is_set_by_reading_shards_not_by_importing(digits_shards: Path) -> None:
    """Importing the loader changes no environment; reading a shard sets webdataset's GOPEN_BUFFER
    (unless the user set one), in the process that reads."""
    program = (
        "import os, sys\n"
        "from dcgan.data.formats import READ_BUFFER\n"
        "from dcgan.data.offline import read_images\n"
        "print(os.environ.get('GOPEN_BUFFER'))\n"
        "images = read_images(sys.argv[1], 16, 1, set(range(8)))\n"
        "print(os.environ.get('GOPEN_BUFFER') == str(READ_BUFFER), sorted(images), images[0].shape)\n"
    )
    env = {k: v for k, v in subprocess_env().items() if k != "GOPEN_BUFFER"}
    result = subprocess.run(
        [sys.executable, "-c", program, str(digits_shards)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.split("\n")[:2] == ["None", "True [0, 1, 2, 3, 4, 5, 6, 7] (1, 16, 16)"], result.stderr
