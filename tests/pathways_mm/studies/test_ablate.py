"""`pathways-mm ablate`: the variants' configs, and an end-to-end run on a debug model."""

import dataclasses
import json

import pytest

from pathways_mm.config import load_config, validate
from pathways_mm.errors import ConfigError
from pathways_mm.model.model import build_model, param_counts
from pathways_mm.studies.ablate import (
    EXTRA,
    VARIANTS,
    equal_active,
    format_markdown,
    run_ablation,
    summarize,
    variant_config,
)
from tests.helpers import MOE_CFG, run_cli, sets

NEW = (
    "model.moe.balance=global",
    "model.moe.mi_coef=0.1",
    "model.moe.mask_mass=0.9",
    "model.moe.mask_step=2",
    "model.moe.mask_window=1",
)
TINY = ("train.steps=3", "train.warmup_steps=1", "eval.max_samples=4", "train.log_every=1", *NEW)


def test_variants_change_only_the_routing_or_the_dense_width():
    cfg = load_config(MOE_CFG, list(NEW))
    dense = variant_config(cfg, "multi_dense", 1)
    assert dense.model.moe.num_experts == 0 and dense.model.d_ff == 2 * 96 and dense.seed == 1
    tokens = variant_config(cfg, "sparse_tokens", 0).model.moe
    assert (tokens.task_prior, tokens.balance, tokens.mi_coef, tokens.mask_mass) == (False, "global", 0.0, 0.0)
    old = variant_config(cfg, "sparse_pathways", 0).model.moe
    assert (old.task_prior, old.balance, old.mi_coef, old.mask_mass) == (True, "per_task", 0.0, 0.0)
    assert variant_config(cfg, "sparse_specific", 0).model.moe == cfg.model.moe  # the config's own routing
    example = variant_config(
        cfg.replace(train=dataclasses.replace(cfg.train, loss_norm="sqrt")), "sparse_specific_example_norm", 0
    )
    assert example.train.loss_norm == "example" and example.model.moe == cfg.model.moe
    assert all(variant_config(cfg, v, 0).eval.routes for v in ("sparse_tokens", "sparse_pathways", "sparse_specific"))


def _router_params(cfg) -> int:
    """Router weights and pathway priors: a few numbers per expert, touched by every token."""
    m = cfg.model
    return (m.n_layers // m.moe.moe_every) * m.moe.num_experts * (m.d_model + m.max_tasks)


@pytest.mark.parametrize(
    "variant", ["flagship", "shared", "fine16", "fine32", "mi005", "nomask", "pruneafter", "loadcap", "sparse_tokens"]
)
def test_sparse_arms_touch_as_many_parameters_per_token_as_the_config(variant):
    cfg = load_config(MOE_CFG, list(NEW))
    arm = variant_config(cfg, variant, 0)
    validate(arm)
    (_, active_a), (_, active_b) = (param_counts(build_model(c.model, 100)) for c in (cfg, arm))
    assert active_b - _router_params(arm) == active_a - _router_params(cfg)
    dense = variant_config(cfg, "multi_dense", 0)
    assert param_counts(build_model(dense.model, 100))[1] == active_a - _router_params(cfg)


def test_flagship_and_the_equal_active_helper():
    cfg = load_config(MOE_CFG, list(NEW))  # 4 experts of 96, top-2: 192 active hidden units
    moe = variant_config(cfg, "flagship", 0).model.moe
    assert (moe.num_experts, moe.expert_d_ff, moe.top_k, moe.shared_d_ff, moe.mi_coef) == (8, 48, 2, 96, 0.005)
    # masks chosen at the last training forward (20 steps), from the last forward's routes: at most 4 of 8
    assert (moe.mask_mass, moe.mask_step, moe.mask_window, moe.mask_max_experts) == (0.9, 20, 1, None)
    late = variant_config(load_config(MOE_CFG), "pruneafter", 0).model.moe  # a config without masks gets 0.95
    assert (late.mask_mass, late.mask_step, late.mask_window) == (0.95, 20, 20)
    fine = equal_active(cfg.model.moe, cfg.model.d_ff, num_experts=32)
    assert (fine.expert_d_ff, fine.top_k, fine.shared_d_ff) == (12, 16, 0)
    with pytest.raises(ConfigError, match="cannot split"):
        equal_active(cfg.model.moe, cfg.model.d_ff, num_experts=7)
    with pytest.raises(ConfigError, match="no top_k"):
        equal_active(cfg.model.moe, cfg.model.d_ff, num_experts=4, shared_d_ff=50)
    assert set(EXTRA) >= {"shared", "fine16", "fine32", "mi005", "nomask", "pruneafter", "loadcap"}
    assert "flagship" in VARIANTS and variant_config(cfg, "loadcap", 0).model.moe.mask_load_cap == 1.5


def test_dense_total_holds_as_many_parameters_as_the_sparse_model():
    cfg = load_config(MOE_CFG, ["model.moe.shared_d_ff=96", "model.moe.top_k=1"])
    dense = variant_config(cfg, "dense_total", 0)
    # blocks 0 (dense, 192) and 1 (MoE: 4 x 96 + 96 shared = 480): every dense FFN 336 wide
    assert dense.model.moe.num_experts == 0 and dense.model.d_ff == 336 and not dense.eval.routes
    total_sparse = param_counts(build_model(cfg.model, 100))[0] - _router_params(cfg)
    assert param_counts(build_model(dense.model, 100))[0] == total_sparse
    assert variant_config(cfg, "multi_dense", 0).model.d_ff == 96 + 96  # top-1 of 96 plus the shared 96


def test_bad_requests_are_config_errors(tmp_path):
    cfg = load_config(MOE_CFG)
    with pytest.raises(ConfigError, match="--variant nope"):
        run_ablation(cfg, 1, tmp_path, ("nope",))
    with pytest.raises(ConfigError, match="--seeds must be >= 1"):
        run_ablation(cfg, 0, tmp_path)
    with pytest.raises(ConfigError, match="--lr must be > 0"):
        run_ablation(cfg, 1, tmp_path, ("multi_dense",), lrs=(1e-3, 0.0))
    # top-1 of 192: a shared expert 192 wide leaves no routed expert to choose
    odd = load_config(MOE_CFG, ["model.moe.expert_d_ff=192", "model.moe.top_k=1"])
    with pytest.raises(ConfigError, match="--variant flagship: no top_k of 8 experts"):
        run_ablation(odd, 1, tmp_path, ("multi_dense", "flagship"))
    with pytest.raises(ConfigError, match="num_experts > 0"):
        run_ablation(cfg.replace(model=variant_config(cfg, "multi_dense", 0).model), 1, tmp_path)


def test_table_shows_mean_and_spread_over_seeds():
    runs = {
        v: [
            {
                "metrics": {"text_lm": {"bits_per_byte": 2.0 + s}, "text_arith": {"exact_match": 0.1 * s}},
                "train_s": 10.0,
                "routes": {"layers": [{"mi_task": 0.5, "mi_task_max": 1.0, "min_expert_load": 0.8}]},
                "export": {"text_lm": {"experts_kept": [2]}, "text_arith": {"experts_kept": [3]}},
            }
            for s in (0, 1)
        ]
        for v in ("multi_dense", "sparse_specific")
    }
    for run in runs["multi_dense"]:
        del run["routes"], run["export"]
    result = summarize(load_config(MOE_CFG), 2, runs)
    lm = result["variants"]["multi_dense"]["tasks"]["text_lm"]["bits_per_byte"]
    assert (lm["mean"], lm["min"], lm["max"], lm["sd"]) == (2.5, 2.0, 3.0, pytest.approx(0.7071, abs=1e-4))
    md = format_markdown(result)
    assert "| text_lm | bits_per_byte (lower is better) | 2.500 ± 0.707 | 2.500 ± 0.707 |" in md
    assert "| I(task; expert) / max, MoE layer 1 | 0.50 ± 0.00 |" in md
    assert "| experts kept by text_arith's export (per layer) | 3.0 of 4 |" in md
    # paired against multi_dense at the same seed; bits_per_byte: lower is better, so the sign flips
    paired = result["variants"]["sparse_specific"]["paired"]
    assert paired["text_lm"]["per_seed"] == [0.0, 0.0] and "paired" not in result["variants"]["multi_dense"]
    assert "Paired differences against multi_dense" in md and "| text_lm | 0.000 ± 0.000 (+0.000, +0.000) |" in md


def test_paired_differences_per_seed_and_per_learning_rate():
    def arm(bpb, em):
        return {"metrics": {"text_lm": {"bits_per_byte": bpb}, "text_arith": {"exact_match": em}}, "train_s": 1.0}

    runs = {
        "multi_dense@lr=0.001": [arm(2.0, 0.5), arm(2.2, 0.4)],
        "flagship@lr=0.001": [arm(1.9, 0.6), arm(2.3, 0.7)],
    }
    paired = summarize(load_config(MOE_CFG), 2, runs)["variants"]["flagship@lr=0.001"]["paired"]
    assert paired["text_lm"]["per_seed"] == [pytest.approx(0.1), pytest.approx(-0.1)]  # lower bpb is better
    assert paired["text_arith"]["per_seed"] == [pytest.approx(0.1), pytest.approx(0.3)]
    assert paired["text_arith"]["mean"] == pytest.approx(0.2)


@pytest.mark.slow
def test_ablation_end_to_end_and_rerun_continues(tmp_path, data_dir):
    out = tmp_path / "abl"
    args = [
        "ablate",
        MOE_CFG,
        "--seeds",
        "2",
        "--out-dir",
        out,
        "--variant",
        "single_dense",
        "--variant",
        "sparse_specific",
        *sets(*TINY),
    ]
    res = run_cli(args, data_dir, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "ablation.json").read_text())
    assert set(result["variants"]) == {"single_dense", "sparse_specific"} and result["seeds"] == 2
    specific = result["variants"]["sparse_specific"]
    assert specific["tasks"]["text_lm"]["bits_per_byte"]["n"] == 2 and len(specific["mi_share"]) == 1
    # the masks after step 2 hold each task to at most num_experts // 2 = 2 experts: the export keeps only those
    assert all(s["max"] <= 2 for per_layer in specific["experts_kept"].values() for s in per_layer)
    assert (out / "single_dense" / "seed1" / "text_arith" / "metrics.jsonl").is_file()
    assert "| text_arith | exact_match |" in (out / "ablation.md").read_text()
    again = run_cli(args, data_dir, timeout=300)  # every run and export is done: only the table is redrawn
    assert again.returncode == 0 and "steps) ->" not in again.stderr and "ablate: export" not in again.stderr, (
        again.stderr
    )
    assert VARIANTS[0] == "single_dense"
