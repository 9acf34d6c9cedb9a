"""Files: atomic writes, output paths checked before work starts, file-system errors in words,
and the one YAML and JSON reader.

Every file pathways-mm writes for later reading (checkpoint metadata and manifests, dataset
caches, reports, routes files) goes through `atomic_writer`: write to a temporary file in the
same folder, flush and fsync it, then rename it over the target. Readers see the old file or
the whole new one, never a part.

Every command checks the paths it will write (`output_file`, `output_dir`) before it does any
work, so a finished evaluation is never thrown away because its report cannot be written; what
the file system refuses later (a full disk) reaches the user as one line (`describe_os_error`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from pathways_mm.errors import ConfigError, clip, shorten

# No room left: the environment, not the input, is at fault (exit status 1, see cli.py).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path`.

    The data is on disk (fsync) before the name points at it; on any error the temporary file
    is removed and `path` is left as it was. The file gets the usual permissions (0666 less the
    umask), not the 0600 of a temporary file. An OSError names `path`.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _naming(e, path) from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _naming(e: OSError, path: Path) -> OSError:
    """`e` with `path` as its file name (a failed write() names no file)."""
    if e.errno is None:
        return e
    return OSError(e.errno, e.strerror, str(path))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_writer(path) as f:
        f.write(text)


def existing(path: str | os.PathLike, what: str, hint: str, kind: str = "file") -> Path:
    """`path` as a Path if it is an existing file (or, with kind="any", anything); else a
    ConfigError `{what} not found: {path} ({hint})` that tells the user what to give instead."""
    p = Path(path)
    if not (p.is_file() if kind == "file" else p.exists()):
        raise ConfigError(f"{what} not found: {p} ({hint})")
    return p


def _check_can_create(p: Path, what: str) -> None:
    """`p` does not exist: its nearest existing ancestor must be a folder this process can write to."""
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {p}: {parent} is a file, not a folder; choose a path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {p}: cannot write in {parent} (permission denied or read-only); choose another path")


def output_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if a file can be written there (it may exist and is then replaced);
    else a ConfigError naming `what` (the flag or key) and what to change."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a folder; give a file path, e.g. {p / 'report.json'}")
    if p.exists():
        if not os.access(p.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {p}: cannot write in {p.parent} (permission denied or read-only)")
        return p
    _check_can_create(p, what)
    return p


def output_dir(path: str | os.PathLike, what: str, empty: bool = False) -> Path:
    """`path` as a Path if it is a folder this process can write in, or can be created; with
    `empty`, an existing folder must hold nothing. Else a ConfigError naming `what`."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p} is a file, not a folder; choose a folder")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {p}: cannot write in it (permission denied or read-only); choose another folder")
        if empty and any(p.iterdir()):
            raise ConfigError(f"{what} {p} exists and is not empty; choose a new folder")
        return p
    _check_can_create(p, what)
    return p


def describe_os_error(e: OSError) -> str:
    """A file-system error in one line: what failed, on which path, and what to change."""
    name = e.filename if e.filename is not None else "a file"
    if e.errno in NO_SPACE:
        return f"no room to write {name} ({e.strerror}): free disk space (or raise the quota) and run again"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {name}; choose a path you can write to (or fix its permissions)"
    if e.errno == errno.EROFS:
        return f"read-only file system: {name}; choose a path on a writable disk"
    if e.errno == errno.EISDIR:
        return f"{name} is a folder; give a file path"
    if e.errno == errno.ENOTDIR:
        return f"{name}: part of this path is a file, not a folder"
    if e.errno == errno.EEXIST:
        return f"{name} already exists; choose another path"
    if e.errno == errno.ENOENT:
        return f"not found: {name}"
    return f"{e.strerror or type(e).__name__}: {name}"


# A config holds a few hundred values; YAML aliases can make a few hundred bytes stand for
# billions (an "alias bomb"), so the loader refuses a document that expands past this.
MAX_YAML_VALUES = 10_000
# YAML 1.1 (PyYAML) reads 1e-3 as a string: its floats need a dot and a signed exponent. These
# are floats in YAML 1.2 and everywhere else people write numbers.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys and expansions past MAX_YAML_VALUES."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {shorten(key)} appears twice (also on line {seen[key]}); keep one",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """How many values `node` stands for once every alias is expanded (each node counted once per use)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise yaml.composer.ComposerError(None, None, "an alias refers to a value that contains it", node.start_mark)
    active.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo, active) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, active) + _expanded_size(v, memo, active) for k, v in node.value)
    if size > MAX_YAML_VALUES:
        raise yaml.composer.ComposerError(
            None,
            None,
            f"expands to more than {MAX_YAML_VALUES} values (YAML aliases); write the values out",
            node.start_mark,
        )
    active.discard(key)
    memo[key] = size
    return size


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML the one way pathways-mm does (configs, `--set` values): safe types only, YAML
    1.2 numbers (`1e-3` is a float), duplicate keys refused, aliases bounded. A ConfigError
    starts with `where` and gives the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML: {e.problem or e.context}{at}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {clip(str(e))}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    except ValueError as e:  # a scalar PyYAML cannot convert (an integer of thousands of digits)
        raise ConfigError(f"{where}: not valid YAML: {clip(str(e))}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {shorten(key)} appears twice")
        out[key] = value
    return out


def load_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file pathways-mm wrote (metadata, manifests, reports, routes files): strict JSON
    (no NaN or Infinity, no duplicate key). A ConfigError names the file and `what` it should be."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except FileNotFoundError:
        raise ConfigError(f"{p}: missing ({what})") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        reason = f"{type(e).__name__}: {clip(str(e), 160)}" if str(e) else type(e).__name__
        raise ConfigError(f"{p}: unreadable {what} ({reason})") from None
