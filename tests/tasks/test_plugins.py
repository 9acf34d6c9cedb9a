"""Out-of-tree tasks: an installed package with an entry point, and a module listed in the config."""

import subprocess
import sys
import textwrap

import pytest

from tests.helpers import DEBUG_CFG, read_metrics, run_cli, sets

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
