"""The task registry: built-in tasks, entry-point plugins and config-listed plugin modules."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
from collections.abc import Iterator
from importlib import metadata

from pathways_mm.errors import ConfigError
from pathways_mm.tasks.base import METRICS, MODALITIES, Task, TaskInfo

ENTRY_POINT_GROUP = "pathways_mm.tasks"
BUILTIN_MODULES = ("pathways_mm.tasks.text_lm", "pathways_mm.tasks.text_arith", "pathways_mm.tasks.multimodal")

_REGISTRY: dict[str, TaskInfo] = {}
_SOURCE: list[str] = []  # the loader that is importing right now (innermost last)
_LOADED = {"builtin": False, "entry_points": False}


@contextlib.contextmanager
def _loading(source: str) -> Iterator[None]:
    _SOURCE.append(source)
    try:
        yield
    finally:
        _SOURCE.pop()


def _check_spec(cls: type, source: str) -> None:
    where = f"task class {cls.__module__}.{cls.__qualname__} (from {source})"
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise ConfigError(f"{where}: register_task expects a subclass of pathways_mm.tasks.Task")
    missing = [a for a in ("name", "modalities", "metrics") if not getattr(cls, a, None)]
    missing += [m for m in ("build_dataset", "encode") if getattr(cls, m) is getattr(Task, m)]
    if missing:
        raise ConfigError(f"{where}: the task spec is missing {', '.join(missing)}")
    if not isinstance(cls.name, str) or not cls.name.isidentifier():
        raise ConfigError(f"{where}: name must be an identifier-like string, got {cls.name!r}")
    bad = [m for m in cls.modalities if m not in MODALITIES]
    if bad:
        raise ConfigError(f"{where}: unknown modalities {bad}; choose from {list(MODALITIES)}")
    bad = [m for m in cls.metrics if m not in METRICS]
    if bad:
        raise ConfigError(f"{where}: unknown metrics {bad}; choose from {list(METRICS)}")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: add a task to the registry. A duplicate name is an error naming both."""
    if _SOURCE:
        source = _SOURCE[-1]
    else:  # imported directly, not through a loader (a built-in module imported by hand counts as builtin)
        source = "builtin" if cls.__module__ in BUILTIN_MODULES else f"module {cls.__module__}"
    _check_spec(cls, source)
    old = _REGISTRY.get(cls.name)
    if old is not None:
        if old.cls is cls:
            return cls
        raise ConfigError(
            f"task '{cls.name}' is registered twice: by {old.source} ({old.cls.__module__}) and by "
            f"{source} ({cls.__module__}); rename one of them"
        )
    _REGISTRY[cls.name] = TaskInfo(name=cls.name, cls=cls, source=source)
    return cls


def register_declared(cls: type[Task], source: str) -> type[Task]:
    """Register a task declared by a config (data, not code): a later declaration of the same
    name replaces an earlier one (another config, or a checkpoint's), but never a task with code."""
    load_builtin()
    load_entry_points()
    _check_spec(cls, source)
    old = _REGISTRY.get(cls.name)
    if old is not None and not getattr(old.cls, "declared", False):
        raise ConfigError(
            f"task '{cls.name}' is declared by {source} but already registered by {old.source} "
            f"({old.cls.__module__}); give the declared task another name"
        )
    _REGISTRY[cls.name] = TaskInfo(name=cls.name, cls=cls, source=source)
    return cls


def _import(module: str, source: str) -> None:
    with _loading(source):
        try:
            importlib.import_module(module)
        except ConfigError:
            raise
        except Exception as e:  # a broken plugin must name itself, not crash deep inside
            raise ConfigError(f"{source}: importing {module!r} failed: {type(e).__name__}: {e}") from e


def load_builtin() -> None:
    if _LOADED["builtin"]:
        return
    _LOADED["builtin"] = True
    for module in BUILTIN_MODULES:
        _import(module, "builtin")


def load_entry_points() -> None:
    if _LOADED["entry_points"]:
        return
    _LOADED["entry_points"] = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        source = f"entry point '{ep.name}'" + (f" of {dist.name} {dist.version}" if dist else "")
        with _loading(source):
            try:
                obj = ep.load()
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(f"plugin {source} ({ep.value}) failed to import: {type(e).__name__}: {e}") from e
            if inspect.isclass(obj) and obj.__dict__.get("name") and obj.__dict__["name"] not in _REGISTRY:
                register_task(obj)


def load_plugins(modules: tuple[str, ...] | list[str]) -> None:
    """Import the modules a config lists under `plugins:`; each registers its tasks."""
    for module in modules:
        _import(module, f"plugin module '{module}'")


def ensure_loaded(plugins: tuple[str, ...] | list[str] = ()) -> None:
    load_builtin()
    load_entry_points()
    load_plugins(plugins)


def list_tasks() -> list[TaskInfo]:
    ensure_loaded()
    return sorted(_REGISTRY.values(), key=lambda t: t.name)


def get_task(name: str) -> Task:
    """A fresh instance of the registered task `name` (ConfigError if unknown)."""
    ensure_loaded()
    info = _REGISTRY.get(name)
    if info is None:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown task '{name}'; {hint}registered: {', '.join(sorted(_REGISTRY))} "
            f"(a plugin task needs its package installed or `plugins: [module]` in the config)"
        )
    return info.cls()
