"""WebDataset shards: uncompressed .tar files whose members are grouped into samples by key,
named by extension (`00042.png`, `00042.wav`, `00042.txt` make one sample with fields png, wav,
txt), as the `webdataset` library groups them; shard lists are brace patterns
(`train-{0000..0099}.tar`), expanded by `webdataset` too.

Training reads samples in a shuffled global order, not shard by shard, so the index holds for
every sample its shard, the offset of its first member's header (to name its key in messages)
and each field's data offset and size: 12 + 16 x fields bytes a row. Building it reads every
member header once; it is cached under the data root (`index/`) until a shard changes.
"""

from __future__ import annotations

import functools
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

from pathways_mm.data.sources.base import DEFAULT_RULES, BadSample, MediaRules, Row, Source, cached_index, file_stamp
from pathways_mm.data.sources.paths import files_inside, pattern_folder
from pathways_mm.errors import ConfigError


def shard_paths(pattern: str, roots: Sequence[Path] = ()) -> list[Path]:
    """The shards a brace pattern names; every one must be a local file inside the pattern's
    folder (or `roots`, data.media_roots), symlinks followed."""
    if "://" in pattern or pattern.startswith("pipe:"):
        raise ConfigError(f"{pattern}: only local shard files are read (nothing is fetched); copy the shards here")
    paths = files_inside([Path(p) for p in expand_urls(pattern)], pattern_folder(pattern), roots, "WebDataset shard")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"WebDataset shard not found: {missing[0]} ({len(missing)} of {len(paths)} missing)")
    return paths


def _index_shard(path: Path, exts: Sequence[str]) -> tuple[list[int], list[list[int]], list[list[int]], str]:
    """(header offset, per-field data offsets, per-field sizes) of each sample; a damage message."""
    col = {ext: j for j, ext in enumerate(exts)}
    headers: list[int] = []
    offsets: list[list[int]] = []
    sizes: list[list[int]] = []
    key = None
    try:
        tf = tarfile.open(path, "r:")
    except tarfile.ReadError as e:
        raise ConfigError(
            f"{path}: not an uncompressed tar file ({e}); WebDataset shards here must be plain .tar"
        ) from None
    damage = ""
    with tf:
        try:
            for member in tf:
                tf.members = []  # the index holds offsets; tarfile would keep every TarInfo
                name = member.name
                if not member.isreg() or (
                    "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)
                ):
                    continue
                prefix, ext = base_plus_ext(name)
                if prefix is None:
                    continue
                if prefix != key:
                    key = prefix
                    headers.append(member.offset)
                    offsets.append([-1] * len(exts))
                    sizes.append([0] * len(exts))
                j = col.get(ext.lower())
                if j is not None:
                    offsets[-1][j], sizes[-1][j] = member.offset_data, member.size
        except tarfile.TarError as e:
            damage = f"{path}: damaged tar after {len(headers)} samples ({e})"
        end = tf.offset  # where the next header would start: only zero blocks may follow
    with path.open("rb") as f:
        f.seek(end)
        if not damage and f.read().strip(b"\0"):
            damage = f"{path}: bytes after its last readable member are not a tar header (a truncated file?)"
    size = path.stat().st_size
    if not damage and any(o + z > size for o, z in zip(offsets[-1] if offsets else [], sizes[-1] if sizes else [])):
        damage = f"{path}: the shard ends inside its last sample (a truncated file?)"
    return headers, offsets, sizes, damage


def _build(paths: list[Path], exts: Sequence[str]) -> dict[str, np.ndarray]:
    shard, header, offset, size, damage = [], [], [], [], []
    for s, path in enumerate(paths):
        h, o, z, d = _index_shard(path, exts)
        shard.append(np.full(len(h), s, np.int32))
        header.append(np.array(h, np.int64))
        offset.append(np.array(o, np.int64).reshape(-1, len(exts)))
        size.append(np.array(z, np.int64).reshape(-1, len(exts)))
        if d:
            damage.append(d)
    return {
        "shard": np.concatenate(shard),
        "header": np.concatenate(header),
        "offset": np.concatenate(offset),
        "size": np.concatenate(size),
        "damage": np.array(damage, dtype=str),
    }


def member_where(path: Path, header: int) -> str:
    """The sample whose first member's header is at `header`, as "SHARD key KEY"."""
    try:
        with tarfile.open(path, "r:") as tf:
            tf.fileobj.seek(header)
            name = tarfile.TarInfo.fromtarfile(tf).name
        return f"{path} key {base_plus_ext(name)[0]}"
    except (OSError, tarfile.TarError):
        return f"{path} at byte {header}"


class ShardSource(Source):
    """WebDataset shards, read sample by sample through the index."""

    kind = "webdataset"

    def __init__(self, pattern: str, fields: Sequence[str], cache: Path, rules: MediaRules = DEFAULT_RULES):
        self.path = Path(pattern)
        self.shards = shard_paths(pattern, rules.roots)
        self.fields = tuple(fields)
        self.rules = rules
        exts = [f.lower() for f in fields]  # webdataset lower-cases extensions
        self._col = {ext: j for j, ext in enumerate(exts)}
        stamp = file_stamp(self.shards) + "-" + "-".join(exts)
        keys = ("shard", "header", "offset", "size", "damage")
        index = cached_index(cache, "webdataset", stamp, keys, lambda: _build(self.shards, exts))
        self.shard, self.header, self.offset, self.size = (index[k] for k in keys[:4])
        self.damage = [str(d) for d in index["damage"]]  # shards cut short: what was read before the damage is kept
        if len(self) == 0:
            raise ConfigError(f"{pattern}: the shards hold no samples")

    def __len__(self) -> int:
        return len(self.shard)

    def describe(self) -> str:
        return f"webdataset {self.path} ({len(self.shards)} shards)"

    def read(self, i: int, fields: Sequence[str] | None = None) -> Row:
        path = self.shards[int(self.shard[i])]
        locate = functools.partial(member_where, path, int(self.header[i]))
        values = {}
        with path.open("rb") as f:
            for name in self.fields if fields is None else fields:
                j = self._col[name.lower()]
                offset, size = int(self.offset[i, j]), int(self.size[i, j])
                if offset < 0:
                    raise BadSample(f"{locate()}: the sample has no .{name.lower()} member")
                if size > self.rules.max_bytes:  # refused from the index, before it is read
                    raise BadSample(
                        f"{locate()}: the .{name.lower()} member has {size} bytes; "
                        f"data.max_media_bytes allows {self.rules.max_bytes}"
                    )
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise BadSample(
                        f"{locate()}: the .{name.lower()} member is cut short ({len(data)} of {size} bytes)"
                    )
                values[name] = data
        return Row(values, path.parent, locate, self.rules)
