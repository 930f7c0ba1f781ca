"""Shards read over HTTP(S): a directory URL's manifest, and shard streams that survive a dropped connection.

`data.shards=http://HOST/PATH/` names a directory that `dcgan shards` wrote and a web server serves
(python -m http.server, nginx): its manifest.json is fetched once, so the per-shard counts, the checksums
and the shape check apply as for a local directory.

Why not webdataset's own http handling: its gopen runs `curl` through a pipe, so a connection dropped
mid-shard ends the pipe and reads as a truncated tar (a damaged shard, not retried, not counted), and a
server that accepts a connection but never answers blocks the reader forever. Here the standard
library's urllib reads each shard with a socket timeout, and a dropped connection is resumed at the byte
where it broke: an HTTP Range request, or, from a server that ignores Range (python's http.server),
the whole shard again with the bytes already read skipped. The tar stream, and with it the sample
stream, is then byte for byte the one an uninterrupted read gives, so the data order and exact resume
stay what they are for local shards.
"""

from __future__ import annotations

import http.client
import io
import logging
import posixpath
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, unquote, urljoin, urlsplit
from urllib.request import Request, urlopen

import webdataset as wds

from dcgan.config import ConfigError
from dcgan.data.formats import MANIFEST, READ_BUFFER, Manifest
from dcgan.errors import ShardError

log = logging.getLogger(__name__)

SCHEMES = ("http://", "https://")


MAX_DELAY_S = 30.0
"""Longest wait between two reconnections, however many data.retries allow."""

RETRYABLE = (OSError, http.client.HTTPException)
"""What a dropped or refused connection raises: ConnectionError, TimeoutError, URLError (all OSError),
IncompleteRead and BadStatusLine (HTTPException). An HTTPError (an OSError too) is sorted by its status
in `_open` first: a 4xx other than 408/429 is an answer, not an outage, and is never retried."""

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses of a server that is overloaded, restarting or behind a proxy that lost it: retried."""


def is_http(url: str) -> bool:
    return url.startswith(SCHEMES)


def shard_name(url: str) -> str:
    """The file name a shard URL ends in, as the manifest lists it (percent-escapes undone)."""
    return unquote(posixpath.basename(urlsplit(url).path))


def server_of(url: str) -> str:
    """scheme://host:port of a URL: what an unreachable-server line names."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _cause(exc: BaseException) -> str:
    """A short reason for a failed request: urllib wraps the socket error in URLError.reason."""
    reason = exc.reason if isinstance(exc, URLError) and not isinstance(exc, HTTPError) else exc
    text = str(reason) or type(reason).__name__
    return text if isinstance(reason, str) else f"{type(reason).__name__}: {text}"


class ShardServerError(ShardError):
    """A shard server that cannot be reached, or a shard it will not give: one line naming the URL.
    The line is kept apart from `args`: webdataset appends ' @ <stream>' to args[0] of an error raised
    while a tar member is read."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line

    def __str__(self) -> str:
        return self.line


@dataclass(frozen=True)
class RetryPolicy:
    """How long a shard read waits for its server: each outage (a dropped or refused connection, a
    silent server, a 5xx answer) gets `retries` reconnections, `backoff_s` apart and doubling (at most
    MAX_DELAY_S), before the run stops; a reconnection that reads again starts a fresh budget.
    Exponential backoff rides out a restart of the server without hammering it while it comes back."""

    retries: int = 6
    timeout_s: float = 30.0
    backoff_s: float = 0.5

    def delays(self) -> list[float]:
        return [min(self.backoff_s * 2**k, MAX_DELAY_S) for k in range(self.retries)]


DEFAULT_RETRY = RetryPolicy()
"""The config's defaults, for readers without a config (evaluation reading its reference set)."""


def uncounted() -> None:
    """Where nobody counts reconnections (evaluation reading its reference set)."""


class HttpShard(io.RawIOBase):
    """One shard's bytes from a web server, resumed at the byte where a dropped connection broke off.

    `on_retry` is called once per reconnection attempt, so that the loader can count them (shard_retries
    in stats.jsonl). A response shorter than its Content-Length (the server killed mid-body: http.client
    then just returns 0 bytes) counts as a drop, not as the end of the shard."""

    def __init__(self, url: str, policy: RetryPolicy, on_retry: Callable[[], None] = uncounted) -> None:
        super().__init__()
        self.url, self.policy, self.on_retry = url, policy, on_retry
        self.position = 0
        self.size: int | None = None
        self.response: http.client.HTTPResponse | None = None
        self._reconnect(None)

    @property
    def name(self) -> str:
        """The URL: io.BufferedReader's repr shows it, and so the tar errors that quote the stream name it."""
        return self.url

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            assert self.response is not None
            try:
                n = self.response.readinto(buffer)
                if n == 0 and len(buffer) and self.size is not None and self.position < self.size:
                    raise ConnectionResetError(f"connection closed before the end of the {self.size}-byte shard")
            except RETRYABLE as exc:
                self._reconnect(exc)
                continue
            self.position += n
            return n

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None
        super().close()

    def _reconnect(self, drop: BaseException | None) -> None:
        """Open the shard at `position`: at once for a new shard, then (or after a drop) with backoff."""
        if self.response is not None:
            self.response.close()
            self.response = None
        last = drop
        if drop is None:
            try:
                self.response = self._open()
                return
            except RETRYABLE as exc:
                last = exc
        delays = self.policy.delays()
        log.warning(
            "shard %s: %s at byte %d; reconnecting (up to %d times over %.0f s)",
            self.url,
            _cause(last) if last else "?",
            self.position,
            len(delays),
            sum(delays),
        )
        for delay in delays:
            time.sleep(delay)
            self.on_retry()
            try:
                self.response = self._open()
            except RETRYABLE as exc:
                last = exc
                continue
            log.warning("shard %s: reconnected at byte %d", self.url, self.position)
            return
        raise ShardServerError(
            f"cannot read shard {self.url}: {len(delays)} reconnections over {sum(delays):.0f} s failed, the last "
            f"with {_cause(last) if last else '?'} (is {server_of(self.url)} up? data.retries and "
            "data.timeout_s bound the wait)"
        )

    def _open(self) -> http.client.HTTPResponse:
        """A response positioned at `position`: 206 from the Range asked for, or 200 with the bytes
        before `position` read and dropped. 4xx answers other than RETRYABLE_STATUS stop the run."""
        headers = {"Range": f"bytes={self.position}-"} if self.position else {}
        try:
            response: http.client.HTTPResponse = urlopen(
                Request(self.url, headers=headers), timeout=self.policy.timeout_s
            )
        except HTTPError as exc:
            if exc.code in RETRYABLE_STATUS:
                raise
            what = "shard not found" if exc.code == 404 else "cannot read shard"
            raise ShardServerError(f"{what}: {self.url} (HTTP {exc.code} {exc.reason})") from None
        if response.status == 206:
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            self.size = int(total) if total.isdigit() else self.size
            return response
        length = response.headers.get("Content-Length")
        self.size = int(length) if length and length.isdigit() else None
        skip = self.position
        while skip:
            dropped = response.read(min(skip, READ_BUFFER))
            if not dropped:
                raise ConnectionResetError(f"connection closed while skipping to byte {self.position}")
            skip -= len(dropped)
        return response


def open_shard(url: str, policy: RetryPolicy, on_retry: Callable[[], None] = uncounted) -> io.BufferedReader:
    return io.BufferedReader(HttpShard(url, policy, on_retry), buffer_size=READ_BUFFER)


def shard_samples(
    url: str, policy: RetryPolicy, on_retry: Callable[[], None], handler: Callable[[Exception], bool]
) -> Iterator[dict[str, Any]]:
    """A shard's samples as webdataset's tarfile_to_samples gives them, read through HttpShard instead
    of gopen's curl pipe; the connection is closed when the shard ends or its reader is dropped."""
    stream = open_shard(url, policy, on_retry)
    try:
        files = wds.tariterators.tar_file_expander(iter([{"url": url, "stream": stream}]), handler=handler)
        yield from wds.tariterators.group_by_keys(files, handler=handler)
    finally:
        stream.close()


def is_directory_url(spec: str) -> bool:
    """A URL ending in '/', or one that names neither a .tar nor a pattern of them."""
    last = posixpath.basename(urlsplit(spec).path)
    return spec.endswith("/") or not (last.endswith(".tar") or "{" in spec or "::" in spec)


def fetch_manifest(directory: str, timeout_s: float) -> Manifest | None:
    """The manifest.json of a directory URL, or None where the server has none (404). A server that
    does not answer within timeout_s is one line naming it, before any work: nothing has been read
    yet, so this is a setting or a server to fix, not an outage to wait out."""
    url = urljoin(directory if directory.endswith("/") else directory + "/", MANIFEST)
    try:
        with urlopen(url, timeout=timeout_s) as response:
            text = response.read()
    except HTTPError as exc:
        if exc.code == 404:
            return None
        raise ShardServerError(f"shard server {server_of(url)}: {url} answered HTTP {exc.code} {exc.reason}") from None
    except RETRYABLE as exc:
        raise ShardServerError(
            f"cannot reach shard server {server_of(url)} ({_cause(exc)}; data.timeout_s={timeout_s:g}): is it "
            f"running, and is data.shards right?"
        ) from None
    try:
        return Manifest.parse(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardServerError(f"{url} is not a shard manifest ({type(exc).__name__}: {exc})") from None


def http_shard_urls(spec: str, timeout_s: float) -> tuple[list[str], Manifest | None]:
    """A directory URL -> its manifest's shard URLs (the manifest is required, as for a local
    directory); a URL pattern -> its expansion, with the manifest beside its first shard if there is one."""
    if is_directory_url(spec):
        manifest = fetch_manifest(spec, timeout_s)
        if manifest is None:
            raise ConfigError(f"data.shards: {spec} has no {MANIFEST} (serve a directory written by `dcgan shards`)")
        base = spec if spec.endswith("/") else spec + "/"
        return [urljoin(base, quote(s.name)) for s in manifest.shards], manifest
    urls = list(wds.shardlists.expand_urls(spec))
    return urls, fetch_manifest(urljoin(urls[0], "."), timeout_s)
