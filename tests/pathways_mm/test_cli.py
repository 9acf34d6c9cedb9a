import pytest

from pathways_mm.config import load_config
from pathways_mm.data.taskset import load_tasks
from tests.helpers import DEBUG_CFG, error_lines, run_cli, sets


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", DEBUG_CFG, *sets("train.stpes=3")], "unknown config key 'train.stpes'; did you mean 'steps'?"),
        (["train", DEBUG_CFG, *sets("train.steps=many")], "train.steps: expected an integer, got str 'many'"),
        (["train", DEBUG_CFG, *sets("tasks=[text_lmm]")], "unknown task 'text_lmm'; did you mean 'text_lm'?"),
        (["train", "no/such/config.yaml"], "config file not found: no/such/config.yaml"),
        (["eval", "no/such/run"], "checkpoint not found: no/such/run"),
        (["eval", "no/such/run", "--max-samples", "-1"], "--max-samples must be between 0 and 1000000000, got -1"),
        (["train", DEBUG_CFG, *sets("train.lr=1e-3", "seed=-1")], "seed must be between 0 and"),
        (
            ["train", DEBUG_CFG, *sets("model.moe.num_experts=4", "model.moe.top_k=9")],
            "top_k (9) must be between",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, data_dir):
    res = run_cli(args, data_dir)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("pathways-mm: error:")]
    assert len(errors) == 1 and message in errors[0], res.stderr


def test_eval_of_a_dir_without_checkpoint(tmp_path, data_dir):
    res = run_cli(["eval", tmp_path], data_dir)
    assert res.returncode == 2 and "no pathways-mm checkpoint" in res.stderr


def test_tasks_lists_builtins(data_dir):
    res = run_cli(["tasks"], data_dir)
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[1:]}
    assert "builtin" in lines["text_lm"] and "text" in lines["text_arith"]


def one_error(res) -> str:
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    return errors[0]


def test_output_paths_are_checked_before_any_work(tmp_path, data_dir):
    """`eval --out DIR` used to evaluate first and then fail to write, throwing the evaluation away."""
    folder, file = tmp_path / "reports", tmp_path / "file"
    folder.mkdir()
    file.write_text("x")
    res = run_cli(["eval", "no/such/run", "--out", folder], data_dir)
    assert res.returncode == 2 and f"--out {folder} is a folder; give a file path" in one_error(res)
    res = run_cli(["export", "--from", "no/such/run", "--task", "x", "--out", file], data_dir)
    assert res.returncode == 2 and f"--out {file} is a file, not a folder" in one_error(res)
    res = run_cli(["routes", file, "--out", file / "sub"], data_dir)
    assert res.returncode == 2 and f"--out {file / 'sub'}: {file} is a file, not a folder" in one_error(res)


@pytest.mark.slow
def test_a_file_where_a_folder_belongs_is_one_line(tmp_path, data_dir):
    file = tmp_path / "file"
    file.write_text("x")
    res = run_cli(["train", DEBUG_CFG, *sets(f"train.out_dir={file}")], data_dir)
    assert res.returncode == 2 and f"train.out_dir {file} is a file, not a folder" in one_error(res)
    res = run_cli(["train", DEBUG_CFG, *sets(f"train.out_dir={tmp_path / 'run'}")], file)  # PMM_DATA is a file
    assert res.returncode == 2 and f"the data root (PMM_DATA or data.root) for the 'text_lm' cache {file}" in one_error(
        res
    )


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_what_could_not_be_written(tmp_path, data_dir):
    """RLIMIT_FSIZE makes writes past 1 MB fail as a full disk does: first the 2 MB text_lm cache of a
    fresh data root, then (with the caches in place) a checkpoint."""
    fresh = tmp_path / "data"
    args = ["train", DEBUG_CFG, *sets("train.steps=2", "eval.max_samples=2", f"train.out_dir={tmp_path / 'run'}")]
    res = run_cli(args, fresh, max_file_bytes=1 << 20)
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"no room to write {fresh / 'text_lm' / 'train-seed1234-v1.jsonl'} (File too large)" in one_error(res)
    assert not list((fresh / "text_lm").glob("*.tmp")) and not list((fresh / "text_lm").glob(".*"))
    load_tasks(load_config(DEBUG_CFG, [f"data.root={fresh}"]))  # the caches, written without a limit
    res = run_cli(args, fresh, max_file_bytes=1 << 20)
    assert res.returncode == 1
    assert one_error(res).startswith(
        f"pathways-mm: error: could not write checkpoint {tmp_path / 'run' / 'checkpoints'}"
    )
    assert "continue from the last complete checkpoint with --resume" in res.stderr
