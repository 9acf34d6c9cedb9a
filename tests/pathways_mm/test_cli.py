import pytest

from tests.helpers import DEBUG_CFG, run_cli, sets


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", DEBUG_CFG, *sets("train.stpes=3")], "unknown config key 'train.stpes'; did you mean 'steps'?"),
        (["train", DEBUG_CFG, *sets("train.steps=many")], "train.steps: expected an integer, got str 'many'"),
        (["train", DEBUG_CFG, *sets("tasks=[text_lmm]")], "unknown task 'text_lmm'; did you mean 'text_lm'?"),
        (["train", "no/such/config.yaml"], "config file not found: no/such/config.yaml"),
        (["eval", "no/such/run"], "checkpoint not found: no/such/run"),
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
