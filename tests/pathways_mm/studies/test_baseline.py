"""Single-task dense baselines: same active parameters, the task's share of the steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathways_mm.config import load_config
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.model.model import build_model, param_counts
from pathways_mm.studies.baseline import baseline_config, comparison_table, dense_counterpart
from tests.helpers import DEBUG_CFG, ROOT, run_cli, sets

DEMO = ROOT / "configs" / "experiments" / "demo.yaml"


def test_dense_counterpart_has_the_sparse_models_active_parameters():
    cfg = load_config(DEMO)
    vocab = load_tokenizer().vocab_size
    _, sparse_active = param_counts(build_model(cfg.model, vocab))
    dense_total, dense_active = param_counts(build_model(dense_counterpart(cfg.model), vocab))
    assert dense_total == dense_active
    # the routers are the only parameters a dense model does not have
    routers = sum(
        p.numel() for n, p in build_model(cfg.model, vocab).named_parameters() if ".gate." in n or "pathway" in n
    )
    assert sparse_active - routers == dense_active


def test_baseline_takes_the_tasks_share_of_the_steps(tmp_path: Path):
    cfg = load_config(DEMO)
    b = baseline_config(cfg, "digit_image", 0.1, tmp_path)
    assert b.tasks == ("digit_image",) and b.model.moe.num_experts == 0
    assert b.train.steps == round(cfg.train.steps * 0.1)
    assert b.train.out_dir == str(tmp_path / "digit_image")
    assert b.train.micro_batch_size == cfg.train.micro_batch_size and b.train.lr == cfg.train.lr


def test_widths_that_no_dense_model_matches_are_refused():
    cfg = load_config(DEMO, ["model.moe.expert_d_ff=100"])
    with pytest.raises(ConfigError, match="no single dense width"):
        dense_counterpart(cfg.model)


def test_comparison_table_puts_both_models_side_by_side():
    single = {"digit_image": {"exact_match": 0.5, "chance": {"exact_match": 0.1}}}
    multi = {"digit_image": {"exact_match": 0.75}}
    table = comparison_table(multi, single, {"digit_image": 12})
    assert "| digit_image | exact_match | 0.750 | 0.500 | 0.100 | 12 |" in table


def test_unknown_task_is_a_one_line_error(data_dir):
    res = run_cli(["baseline", DEMO, "--task", "nope"], data_dir)
    assert res.returncode == 2
    assert "pathways-mm: error: --task nope: not one of the experiment's tasks" in res.stderr


@pytest.mark.parametrize(
    "report", ['{"tasks": {"text_arith": 5}}', '{"tasks": {"text_arith": {"exact_match": "high"}}}', "[1]"]
)
def test_a_bad_compare_file_is_refused_before_any_training(report, tmp_path, data_dir):
    bad = tmp_path / "eval.json"
    bad.write_text(report)
    out = tmp_path / "baselines"
    args = ["baseline", DEBUG_CFG, "--task", "text_arith", "--compare", bad, "--out-dir", out]
    res = run_cli([*args, *sets("train.steps=1", "eval.max_samples=2")], data_dir)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"pathways-mm: error: {bad}: not an evaluation report" in res.stderr
    assert not out.exists()  # nothing trained
