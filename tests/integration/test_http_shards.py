"""Shards over HTTP against real web servers on loopback: python's http.server serving a shard directory
(killed and started again on the same port mid-epoch, or killed for good), and tests/shard_server.py,
http.server that drops every shard's first connection mid-body. What an uninterrupted read gives is
the reference: the same batches, byte for byte, as from the local directory."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.request import urlopen

import pytest
import torch
from distributed_helpers import descendants, start_training, wait_for
from helpers import CPU, ROOT, TINY, free_port, read_stats, run_in_process, tiny_config

from dcgan.config import ConfigError
from dcgan.data.stream import ShardSource
from dcgan.errors import EXIT_OK, ShardError
from dcgan.train.loop import train

READY_S = 20.0
"""Longest wait for a server to answer after its start (a loaded 2-core machine starts Python slowly)."""


class Server:
    """A web server process serving `directory` on a fixed loopback port, which can be killed and
    started again on the same port (http.server sets SO_REUSEADDR)."""

    def __init__(self, directory: Path, *extra: str, script: Path | None = None) -> None:
        self.directory, self.port = directory, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        where = [str(script), str(directory), str(self.port)] if script else self._module_args()
        self.command = [sys.executable, *where, *extra]
        self.process: subprocess.Popen[bytes] | None = None

    def _module_args(self) -> list[str]:
        return ["-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(self.directory)]

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_S
        while True:
            try:
                with urlopen(self.url + "manifest.json", timeout=1) as response:
                    response.read()
                return
            except OSError:
                assert self.process.poll() is None, "the server exited at start"
                assert time.monotonic() < deadline, f"the server did not answer within {READY_S} s"
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def served(digits_shards: Path) -> Iterator[Server]:
    """python -m http.server serving the digits shards; killed at teardown whatever the test did."""
    server = Server(digits_shards)
    server.start()
    yield server
    server.kill()


def shard_source(shards: str, tmp_path: Path, *overrides: str) -> ShardSource:
    config = tiny_config(tmp_path, f"data.shards={shards}", "data.workers=0", *overrides)
    return ShardSource(config, CPU, pin_memory=False)


def batches(source: ShardSource, n: int) -> list[torch.Tensor]:
    stream = iter(source)
    try:
        return [next(stream) for _ in range(n)]
    finally:
        source.close()


def test_a_directory_url_streams_the_batches_of_the_local_directory(
    served: Server, digits_shards: Path, tmp_path: Path
) -> None:
    """The manifest comes over HTTP: its counts give the epoch, the shape check applies; two epochs of
    batches (the second one resampled) equal those from the directory on disk."""
    local = shard_source(str(digits_shards), tmp_path)
    remote = shard_source(served.url, tmp_path)
    assert remote.shards.counts == local.shards.counts and remote.shards.total == 1797
    assert remote.shards.urls[0] == f"{served.url}shard-000000.tar"
    assert remote.batches_per_epoch == local.batches_per_epoch == 1797 // 16
    n = 2 * local.batches_per_epoch
    assert all(torch.equal(a, b) for a, b in zip(batches(local, n), batches(remote, n), strict=True))
    assert remote.shard_retries == 0
    with pytest.raises(ConfigError, match="model.resolution: the shards hold 16x16 images, config says 32"):
        shard_source(served.url.rstrip("/"), tmp_path, "model.resolution=32")  # no trailing '/': a directory too


@pytest.mark.slow  # three short trainings and two server processes
def test_connections_dropped_mid_shard_resume_at_the_byte_and_train_as_from_disk(
    digits_shards: Path, tmp_path: Path
) -> None:
    """Every shard's first read breaks off after 20000 bytes (inside its third block): the reader
    reconnects and resumes at that byte, by a Range request (as from nginx) or by reading the whole shard
    again and skipping the bytes read (python's http.server ignores Range), and the training is the one
    from disk, loss for loss; the reconnections reach stats.jsonl."""
    overrides = ("train.steps=20", "log.every=10", "sample.every=20", "checkpoint.every=20")
    sources = {"disk": str(digits_shards)}
    servers = [
        Server(digits_shards, "--cut", "20000", *ranges, script=ROOT / "tests" / "support" / "shard_server.py")
        for ranges in ([], ["--ranges"])
    ]
    try:
        for name, server in zip(("resent", "range"), servers, strict=True):
            server.start()
            sources[name] = server.url
        for name, shards in sources.items():
            assert train(tiny_config(tmp_path / name, f"data.shards={shards}", *overrides)) == EXIT_OK
    finally:
        for server in servers:
            server.kill()
    disk = read_stats(tmp_path / "disk")
    assert all(row["shard_retries"] == 0 for row in disk)
    for name in ("resent", "range"):
        remote = read_stats(tmp_path / name)
        assert [row["loss_D"] for row in remote] == [row["loss_D"] for row in disk], name
        assert [row["loss_G"] for row in remote] == [row["loss_G"] for row in disk], name
        assert remote[-1]["shard_retries"] >= 1 and remote[-1]["skipped_samples"] == 0, name


@pytest.mark.slow  # waits out a server restart
def test_a_server_killed_mid_epoch_and_started_again_continues_the_same_stream(
    served: Server, digits_shards: Path, tmp_path: Path
) -> None:
    """Killed after 30 batches of an epoch, back 1.5 s later on the same port: the reader waits
    (reconnections counted), and its batches are those of an uninterrupted read."""
    reference = batches(shard_source(str(digits_shards), tmp_path), 150)
    source = shard_source(served.url, tmp_path)
    stream = iter(source)
    got = [next(stream) for _ in range(30)]
    served.kill()
    restart = threading.Timer(1.5, served.start)
    restart.start()
    try:
        got += [next(stream) for _ in range(120)]  # more than the shuffle buffer holds: new shards are read
    finally:
        restart.join()
        source.close()
    assert all(torch.equal(a, b) for a, b in zip(reference, got, strict=True))
    assert source.shard_retries >= 1


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow  # a training in a process of its own
def test_a_server_killed_for_good_ends_the_run_in_one_line_within_the_retry_budget(
    served: Server, tmp_path: Path
) -> None:
    """data.retries=2: reconnections 0.5 s and 1 s after the drop, then one line naming the shard's URL;
    the run's loader worker is gone with it."""
    run = tmp_path / "run"
    training = start_training(
        run, f"data.shards={served.url}", "data.workers=1", "data.retries=2", "train.steps=100000", "log.every=5"
    )
    try:
        wait_for(lambda: (run / "stats.jsonl").is_file() and bool((run / "stats.jsonl").read_text()), training)
        processes = descendants(training.pid)
        served.kill()
        killed = time.monotonic()
        _, stderr = training.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if training.poll() is None:
            training.kill()
            training.wait()
    assert training.returncode == 1 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"dcgan: error: cannot read shard {served.url}shard-0000"), stderr
    assert "2 reconnections over 2 s failed" in last and f"is {served.url.rstrip('/')} up?" in last
    assert took < 1.5 + 20  # the backoff, then the run's own teardown (a loaded 2-core machine); not 31.5 s of defaults
    assert processes  # its loader worker, and the forkserver that started it
    gone = time.monotonic() + 5  # they notice their parent's end on their own, within moments
    while [pid for pid in processes if alive(pid)] and time.monotonic() < gone:
        time.sleep(0.05)
    assert not [pid for pid in processes if alive(pid)]


def test_an_unreachable_server_is_one_line_naming_it_before_the_run_directory_exists(tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    run = tmp_path / "run"
    result = run_in_process(
        "train", str(TINY), f"data.shards=http://127.0.0.1:{port}/shards/", f"run.dir={run}", check=False
    )
    assert (result.returncode, result.stderr) == (
        1,
        f"dcgan: error: cannot reach shard server http://127.0.0.1:{port} (ConnectionRefusedError: [Errno 111] "
        "Connection refused; data.timeout_s=30): is it running, and is data.shards right?\n",
    )
    assert not run.exists()


def test_a_server_that_never_answers_is_refused_after_the_timeout(tmp_path: Path) -> None:
    """A listening socket nobody serves (a hung server: the kernel accepts the connection, no reply comes)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/shards/"
        started = time.monotonic()
        with pytest.raises(ShardError, match=r"cannot reach shard server http://127\.0\.0\.1:\d+ \(.*timed out"):
            shard_source(url, tmp_path, "data.timeout_s=1")
        assert time.monotonic() - started < 5


def test_a_missing_shard_on_the_server_is_one_line_naming_it(served: Server, tmp_path: Path) -> None:
    """A 404 is an answer, not an outage: no reconnection, the URL named at once."""
    source = shard_source(f"{served.url}shard-000009.tar", tmp_path, "data.epoch_samples=32")
    assert source.shards.counts is None and source.shards.manifest is not None  # the manifest beside it
    with pytest.raises(ShardError, match=rf"shard not found: {served.url}shard-000009.tar \(HTTP 404"):
        batches(source, 1)
    assert source.shard_retries == 0


def test_bench_data_times_the_loader_on_a_directory_url(served: Server) -> None:
    result = run_in_process(
        "bench",
        "data",
        served.url,
        "--workers",
        "0",
        "--batch-size",
        "16",
        "--batches",
        "10",
        "--partitions-per-worker",
        "1",
    )
    header, row = result.stdout.strip().splitlines()
    assert header.split()[:3] == ["workers", "partitions", "img/s"]
    assert row.split()[:2] == ["0", "1"] and float(row.split()[2]) > 0
