"""The task registry: duplicates and incomplete specs are refused, unknown names get a hint."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from pathways_mm.errors import ConfigError
from pathways_mm.tasks import MultimodalExample, Task, get_task, register_task, registry


@pytest.fixture
def scratch_registry():
    """Drop whatever a test registers, so the global registry is as it was."""
    registry.ensure_loaded()
    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


def make_task(name="scratch_task", drop=()):
    """A throwaway task class; `drop` names the fields and methods it leaves out."""
    attrs = {
        "name": name,
        "modalities": ("text",),
        "metrics": ("exact_match",),
        "build_dataset": lambda self, split, root, seed: [{"x": 1}],
        "encode": lambda self, s: MultimodalExample(task=name, segments=(("text", ""),), target_text="1"),
    }
    for key in drop:
        del attrs[key]
    return type("ScratchTask", (Task,), attrs)


LIST_SOURCES = "from pathways_mm.tasks import list_tasks; print({t.name: t.source for t in list_tasks()})"


@pytest.mark.parametrize(
    "first",
    [
        "",
        "import pathways_mm.tasks.text_lm; ",
    ],
    ids=["fresh", "text_lm-imported-first"],
)
def test_builtin_tasks_are_listed(first):
    # a fresh interpreter: in this one, other test modules have imported the task modules already
    out = subprocess.run([sys.executable, "-c", first + LIST_SOURCES], capture_output=True, text=True, check=True)
    sources = ast.literal_eval(out.stdout.strip())
    assert sources["text_lm"] == "builtin"
    assert sources["text_arith"] == "builtin"


def test_register_and_get(scratch_registry):
    register_task(make_task())
    assert get_task("scratch_task").name == "scratch_task"
    assert register_task(registry._REGISTRY["scratch_task"].cls)  # the same class again is fine


def test_duplicate_name_names_both_sources(scratch_registry):
    with registry._loading("plugin module 'first_pkg'"):
        register_task(make_task())
    with pytest.raises(ConfigError) as err:
        with registry._loading("plugin module 'second_pkg'"):
            register_task(make_task())
    assert "first_pkg" in str(err.value) and "second_pkg" in str(err.value)
    assert "scratch_task" in str(err.value)


def test_duplicate_of_a_builtin_is_refused(scratch_registry):
    with pytest.raises(ConfigError, match=r"pathways_mm\.tasks\.text_lm.*test_registry"):
        register_task(make_task(name="text_lm"))


def test_a_declared_task_replaces_a_declared_one_but_never_a_task_with_code(scratch_registry):
    first, second = make_task(name="own_task"), make_task(name="own_task")
    first.declared = second.declared = True
    registry.register_declared(first, "declared in a.yaml")
    registry.register_declared(second, "declared in b.yaml")  # another config declares it anew
    assert (
        registry._REGISTRY["own_task"].cls is second and registry._REGISTRY["own_task"].source == "declared in b.yaml"
    )
    with pytest.raises(
        ConfigError, match=r"'text_lm' is declared by declared in c.yaml but already registered by builtin"
    ):
        registry.register_declared(make_task(name="text_lm"), "declared in c.yaml")


@pytest.mark.parametrize("missing", ["name", "modalities", "metrics", "build_dataset", "encode"])
def test_incomplete_spec_names_what_is_missing(scratch_registry, missing):
    with pytest.raises(ConfigError, match=f"missing {missing}"):
        register_task(make_task(drop=(missing,)))
    assert "scratch_task" not in registry._REGISTRY


def test_unknown_task_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'text_lm'"):
        get_task("text_lmm")
