"""Finding a run's shards: a local directory, a pattern, or an http(s) directory with manifest.json,
resolved into one ShardSet with its manifest; its images' shape checked against the model's before any
work; a shard that fails to read named in the error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from dcgan.config import Config, ConfigError
from dcgan.data.formats import MANIFEST, Manifest
from dcgan.data.remote import RetryPolicy, http_shard_urls, is_http, shard_name
from dcgan.errors import ShardError


@dataclass(frozen=True)
class ShardSet:
    """Resolved `data.shards`: the shard URLs, their sample counts (if known), and the image format."""

    urls: list[str]
    counts: list[int] | None
    manifest: Manifest | None

    @property
    def total(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def resolve_shards(spec: str, timeout_s: float = RetryPolicy.timeout_s) -> ShardSet:
    """A directory with manifest.json, a brace pattern of local files, pipe: URLs, or http(s) URLs: a
    directory URL with manifest.json, or a pattern (dcgan.data.remote; timeout_s bounds the wait for
    the server's manifest)."""
    path = Path(spec)
    manifest: Manifest | None
    if is_http(spec):
        urls, manifest = http_shard_urls(spec, timeout_s)
        by_name = {s.name: s.samples for s in manifest.shards} if manifest is not None else {}
        names = [shard_name(u) for u in urls]
        counts = [by_name[n] for n in names] if by_name and all(n in by_name for n in names) else None
    elif path.is_dir():
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ConfigError(f"data.shards: {path} has no {MANIFEST} (write shards with `dcgan shards`)")
        manifest = Manifest.read(manifest_path)
        assert manifest is not None
        urls = [str(path / s.name) for s in manifest.shards]
        counts = [s.samples for s in manifest.shards]
    else:
        urls = list(wds.shardlists.expand_urls(spec))  # braces, '::' lists, $WDS_ variables
        manifest_path = Path(urls[0]).parent / MANIFEST
        manifest = (
            Manifest.read(manifest_path)
            if "://" not in spec and not spec.startswith("pipe:") and manifest_path.is_file()
            else None
        )
        counts = None
        if manifest is not None:
            by_name = {s.name: s.samples for s in manifest.shards}
            counts = [by_name[Path(u).name] for u in urls] if all(Path(u).name in by_name for u in urls) else None
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise ShardError(f"shard not found: {url}")
    if not urls:
        raise ConfigError(f"data.shards: no shards match {spec!r}")
    return ShardSet(urls, counts, manifest)


def raise_naming_shard(exc: Exception) -> bool:
    """webdataset handler for tar-level errors: stop with the shard's name (never sleep, never skip).
    webdataset passes an error to the handler once per pipeline stage it crosses, so a ShardError
    already raised here comes back and is re-raised as it is."""
    if isinstance(exc, ShardError):
        raise exc
    text = " ".join(str(a) for a in exc.args)
    match = re.search(r"name='([^']+)'", text) or re.search(r"(\S+\.tar)\b", text)
    where = match.group(1) if match else "?"
    reason = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
    raise ShardError(
        f"cannot read shard {where}: {type(exc).__name__}: {reason} (truncated or damaged: write it again with `dcgan shards`)"
    ) from exc


def check_shape(shards: ShardSet, config: Config) -> None:
    """The shards' resolution and channels must be the model's (checked before any training)."""
    m = shards.manifest
    if m is None:
        return
    if m.resolution != config.model.resolution:
        raise ConfigError(
            f"model.resolution: the shards hold {m.resolution}x{m.resolution} images, config says {config.model.resolution}"
        )
    if m.channels != config.model.channels:
        raise ConfigError(
            f"model.channels: the shards hold {m.channels}-channel images, config says {config.model.channels}"
        )
