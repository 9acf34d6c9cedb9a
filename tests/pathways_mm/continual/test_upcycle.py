"""`pathways-mm upcycle`: a dense model's FFNs become experts, the model keeps its function and trains on."""

import pytest
import torch

from pathways_mm.config import ExperimentConfig, ModelConfig, MoEConfig, load_config
from pathways_mm.continual import surgery
from pathways_mm.continual.upcycle import upcycled_config
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.model.batch import Batch
from pathways_mm.model.model import build_model
from pathways_mm.routing import moe_layers
from pathways_mm.routing.pathways import expert_key
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime.engine import lr_lambda
from tests.helpers import DEBUG_CFG, MOE_CFG, read_metrics, run_cli, sets

TOK = load_tokenizer()
DENSE = ModelConfig(n_layers=4)


def test_every_expert_starts_as_its_layers_ffn_and_the_model_computes_the_same():
    torch.manual_seed(0)
    dense = build_model(DENSE, TOK.vocab_size)
    cfg = upcycled_config(ExperimentConfig(model=DENSE), num_experts=4, top_k=2, moe_every=2, out_dir="x")
    moe = build_model(cfg.model, TOK.vocab_size)
    layers = [name for name, _ in moe_layers(moe)]
    assert layers == ["decoder.blocks.1.ffn", "decoder.blocks.3.ffn"]
    state = surgery.upcycle(dense.state_dict(), moe.state_dict(), layers)
    moe.load_state_dict(state)
    for layer in layers:
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                assert torch.equal(state[expert_key(layer, e, w)], dense.state_dict()[f"{layer}.{w}.weight"])
        assert not state[f"{layer}.deepspeed_moe.gate.pathway"].any()  # fresh priors
    assert torch.equal(state["decoder.blocks.0.ffn.w1.weight"], dense.state_dict()["decoder.blocks.0.ffn.w1.weight"])
    tokens = torch.randint(3, TOK.vocab_size, (2, 9))
    batch = Batch(
        tokens=tokens,
        task_ids=torch.tensor([0, 1]),
        prefix_len=torch.tensor([4, 4]),
        lengths=torch.tensor([9, 9]),
        labels=torch.full((2, 9), -100),
        target_bytes=torch.zeros(2, dtype=torch.long),
        modality_ids=torch.zeros(2, 9, dtype=torch.long),
        markers=torch.full((2, 9), -1),
    )
    with torch.no_grad():
        assert torch.allclose(moe.eval()(batch).logits, dense.eval()(batch).logits, atol=1e-5)


def test_upcycle_refuses_what_it_cannot_do():
    dense = ExperimentConfig(model=DENSE)
    for kw, message in [
        (dict(num_experts=4, top_k=5), "top-k"),
        (dict(num_experts=0, top_k=1), "top-k"),
        (dict(num_experts=4, top_k=2, moe_every=9), "--moe-every 9"),
    ]:
        with pytest.raises(ConfigError, match=message):
            upcycled_config(dense, kw["num_experts"], kw["top_k"], kw.get("moe_every"), "x")
    moe = ExperimentConfig(model=ModelConfig(moe=MoEConfig(num_experts=4)))
    with pytest.raises(ConfigError, match="already an MoE model"):
        upcycled_config(moe, 4, 2, None, "x")


@pytest.mark.slow
def test_a_dense_run_upcycles_and_trains_on_like_a_resume(tmp_path, data_dir):
    dense = tmp_path / "dense"
    settings = sets("train.steps=6", "eval.max_samples=4", f"train.out_dir={dense}")
    res = run_cli(["train", DEBUG_CFG, *settings, "--stop-after", "3"], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    up = tmp_path / "up"
    res = run_cli(["upcycle", "--from", dense, "--num-experts", "4", "--top-k", "2", "--out", up], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "max |logit difference| from the dense model" in res.stderr
    diff = float(res.stderr.split("max |logit difference| from the dense model ")[1].split()[0])
    assert diff < 1e-4
    tag = ckpt.resolve_checkpoint(up)
    meta = ckpt.read_meta(tag)
    assert meta["step"] == 3 and meta["config"]["model"]["moe"]["num_experts"] == 4
    assert meta["upcycled_from"]["step"] == 3 and meta["config"]["train"]["out_dir"] == str(up)
    # Adam's moments: every expert has its FFN's; the router none
    opt = torch.load(tag / "expp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)["optimizer"]
    dense_opt = torch.load(ckpt.resolve_checkpoint(dense) / "mp_rank_00_model_states.pt", weights_only=True)[
        "optimizer"
    ]
    moments = {tuple(s["exp_avg"].shape) for s in opt["state"].values()}
    assert (4, 192, 64) in moments  # stacked experts of d_ff 192
    assert len(opt["state"]) == len(dense_opt["state"])  # the two router tensors have none; the FFN's moved to experts
    res = run_cli(["train", up / "config.yaml", "--resume", *sets("train.log_every=1")], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "steps 3->6" in res.stderr
    records = [r for r in read_metrics(up) if "loss" in r]
    assert [r["step"] for r in records] == [4, 5, 6]
    # the learning-rate schedule goes on from step 3, as in the dense run (no new warm-up)
    cfg = load_config(DEBUG_CFG, ["train.steps=6"])
    f = lr_lambda(cfg)
    assert [r["lr"] for r in records] == pytest.approx([cfg.train.lr * f(s) for s in (4, 5, 6)])


@pytest.mark.slow
def test_upcycle_errors_are_one_line(tmp_path, data_dir):
    res = run_cli(
        ["train", MOE_CFG, *sets("train.steps=1", "eval.max_samples=2", f"train.out_dir={tmp_path / 'moe'}")], data_dir
    )
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(
        ["upcycle", "--from", tmp_path / "moe", "--num-experts", "4", "--top-k", "2", "--out", tmp_path / "u"], data_dir
    )
    assert res.returncode == 2 and "already an MoE model" in res.stderr
    assert not (tmp_path / "u").exists()
