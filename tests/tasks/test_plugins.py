"""Out-of-tree tasks: an installed package with an entry point, and a module listed in the config."""

import json
import subprocess
import sys
import textwrap

import pytest

from pathways_mm.data.datasets import load_split
from pathways_mm.tasks import get_task, registry
from tests.helpers import DEBUG_CFG, MOE_CFG, ROOT, error_lines, read_metrics, run_cli, sets

TASK_MODULE = textwrap.dedent(
    """
    from pathways_mm.tasks import MultimodalExample, Task, register_task


    @register_task
    class {cls}(Task):
        name = "{name}"
        modalities = ("text",)
        metrics = ("exact_match",)

        def build_dataset(self, split, root, seed):
            words = ["red", "green", "blue", "black"]
            return [{{"w": w}} for w in words * (20 if split == "train" else 2)]

        def encode(self, sample):
            return MultimodalExample(task=self.name, segments=(("text", "echo " + sample["w"]),), target_text=sample["w"])
    """
)


def make_package(root, dist="pmm-echo-task", module="pmm_echo", cls="EchoTask", name="echo"):
    pkg = root / "src"
    (pkg / module).mkdir(parents=True)
    (pkg / module / "__init__.py").write_text(TASK_MODULE.format(cls=cls, name=name))
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.0.1"

        [project.entry-points."pathways_mm.tasks"]
        {name} = "{module}:{cls}"

        [tool.setuptools]
        packages = ["{module}"]
    ''')
    )
    site = root / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(pkg),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return site


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("plugin"))


def test_installed_entry_point_task_is_listed_and_trains(plugin_site, tmp_path, data_dir):
    env = {"PYTHONPATH": str(plugin_site)}
    res = run_cli(["tasks"], data_dir, env_extra=env)
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("echo "))
    assert "entry point 'echo' of pmm-echo-task 0.0.1" in row and "text" in row
    out = tmp_path / "run"
    res = run_cli(
        [
            "train",
            DEBUG_CFG,
            *sets("tasks=[text_arith,echo]", "train.steps=3", "eval.max_samples=4", f"train.out_dir={out}"),
        ],
        data_dir,
        env_extra=env,
    )
    assert res.returncode == 0, res.stderr
    final = read_metrics(out)[-1]
    assert set(final["eval"]) == {"text_arith", "echo"}


def test_duplicate_task_name_from_a_plugin_is_refused(tmp_path, data_dir):
    site = make_package(tmp_path, dist="pmm-dup-task", module="pmm_dup", cls="Dup", name="text_arith")
    res = run_cli(["tasks"], data_dir, env_extra={"PYTHONPATH": str(site)})
    assert res.returncode == 2
    assert "task 'text_arith' is registered twice" in res.stderr
    assert "builtin" in res.stderr and "pmm-dup-task" in res.stderr


def test_config_plugins_are_imported(tmp_path, data_dir):
    (tmp_path / "my_tasks.py").write_text(TASK_MODULE.format(cls="Shout", name="shout"))
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(DEBUG_CFG.read_text() + "\nplugins: [my_tasks]\n")
    out = tmp_path / "run"
    res = run_cli(
        [
            "train",
            cfg,
            *sets(
                "tasks=[shout]",
                "train.steps=2",
                "eval.max_samples=2",
                f"train.out_dir={out}",
                f"train.ds_config={DEBUG_CFG.parent.parent / 'ds' / 'cpu.json'}",
            ),
        ],
        data_dir,
        env_extra={"PYTHONPATH": str(tmp_path)},
    )
    assert res.returncode == 0, res.stderr
    assert set(read_metrics(out)[-1]["eval"]) == {"shout"}


def test_broken_plugin_names_itself(tmp_path, data_dir):
    (tmp_path / "broken_tasks.py").write_text("raise RuntimeError('boom')\n")
    res = run_cli(["tasks", "--plugin", "broken_tasks"], data_dir, env_extra={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 2
    assert "plugin module 'broken_tasks'" in res.stderr and "boom" in res.stderr and "Traceback" not in res.stderr


WORDS_MODULE = (
    TASK_MODULE.format(cls="Shout", name="shout") + TASK_MODULE.format(cls="Whisper", name="whisper").split("\n", 3)[3]
)


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory, data_dir):
    """An MoE run trained from a config in the user's own folder (outside the repository, so the
    default DeepSpeed settings must resolve without it) that lists `plugins: [pmm_words]`."""
    home = tmp_path_factory.mktemp("plugin_user")
    (home / "lib").mkdir()
    (home / "lib" / "pmm_words.py").write_text(WORDS_MODULE)
    cfg = home / "exp.yaml"
    cfg.write_text(MOE_CFG.read_text() + "\nplugins: [pmm_words]\n")
    out = home / "run"
    env = {"PYTHONPATH": str(home / "lib")}
    args = [
        "train",
        cfg,
        *sets("tasks=[text_arith,shout]", "train.steps=2", "eval.max_samples=2", f"train.out_dir={out}"),
    ]
    res = run_cli(args, data_dir, env_extra=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, cfg, env


@pytest.mark.slow
def test_eval_and_export_honour_the_users_plugins_not_the_checkpoints(plugin_run, tmp_path, data_dir):
    run, _, env = plugin_run
    res = run_cli(["eval", run, "--max-samples", "2", "--out", tmp_path / "e.json"], data_dir, env_extra=env)
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1, res.stderr[-2000:]
    assert "task 'shout' of" in res.stderr and "add --set plugins=[pmm_words]" in res.stderr
    quick = ["--max-samples", "2", *sets("plugins=[pmm_words]")]
    res = run_cli(["eval", run, *quick, "--out", tmp_path / "e.json"], data_dir, env_extra=env)
    assert res.returncode == 0 and "shout" in res.stdout, res.stderr[-2000:]
    assert "No existing process group" not in res.stdout + res.stderr  # DeepSpeed's start-up chatter, held back
    res = run_cli(
        ["export", "--from", run, "--task", "shout", "--out", tmp_path / "x", *quick], data_dir, env_extra=env
    )
    assert res.returncode == 0 and (tmp_path / "x" / "model.safetensors").is_file(), res.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--set", "--config"])
def test_add_task_honours_the_users_plugins(how, plugin_run, tmp_path, data_dir):
    run, cfg, env = plugin_run
    flags = [*sets("plugins=[pmm_words]")] if how == "--set" else ["--config", cfg]
    args = ["add-task", "--from", run, "--task", "whisper", "--steps", 1, "--out-dir", tmp_path / "w", *flags]
    res = run_cli([*args, *sets("eval.max_samples=2")], data_dir, env_extra=env)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "w" / "add_task_report.json").read_text())
    assert report["task"] == "whisper" and report["old_outputs_bit_identical"] is True


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def test_the_task_guide_says_what_a_plugin_author_needs():
    guide = _readme_section("Writing a task")
    for name in ("chance(", "generation", "description", "group(", "data_version", "bind(", "final_answer("):
        assert f"`{name}" in guide, name
    assert '[project.entry-points."pathways_mm.tasks"]' in guide and "--set plugins=[my_pkg.tasks]" in guide
    synopsis = _readme_section("Command line")
    eval_line = synopsis[synopsis.index("pathways-mm eval") : synopsis.index("pathways-mm routes")]
    add_task = synopsis[synopsis.index("pathways-mm add-task") : synopsis.index("pathways-mm export")]
    assert "--set" in eval_line and all(f in add_task for f in ("--adapter-rank", "--config", "--set", "--train-all"))


@pytest.mark.slow
def test_a_plugin_on_the_builtin_digit_split_sees_no_test_image_in_training(data_dir, monkeypatch):
    """The guide's example, run as written: a plugin built on `digit_images(split, root, seed)` uses the
    built-in split, so none of the images the built-in tasks test on is in its training data."""
    registry.ensure_loaded()  # before the copy: loaded into it, the built-ins would be gone after the test
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the example registers a task
    blocks = _readme_section("Writing a task").split("```python\n")[1:]
    example = next(code for code in (b.split("```")[0] for b in blocks) if "digit_images" in code)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    seed, plugin = 1234, namespace["DigitParity"]()
    train = {plugin.encode(s).segments[0][1].tobytes() for s in load_split(plugin, "train", data_dir, seed)}
    builtin = get_task("digit_image")
    builtin_test = {builtin.encode(s).segments[0][1].tobytes() for s in load_split(builtin, "test", data_dir, seed)}
    assert len(train) > 1000 and len(builtin_test) > 300
    assert not train & builtin_test
