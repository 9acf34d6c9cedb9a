import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from pathways_mm.bench.common import synthetic_batch
from pathways_mm.bench.moe import saved_bytes
from pathways_mm.config import SIZES, ModelConfig, MoEConfig
from pathways_mm.errors import ConfigError
from pathways_mm.model.model import build_model, param_counts
from pathways_mm.plan import (
    ENOUGH_TOKENS,
    GIB,
    activation_bytes,
    all_to_all_bytes,
    count_params,
    format_plan,
    format_search,
    model_shape,
    plan,
    preference,
    search,
    shape_from_config,
)
from pathways_mm.training.losses import forward_loss
from tests.helpers import run_cli

VOCAB = 1024

# name: (size, overrides, MoE config)
MODELS = {
    "debug-dense": ("debug", {}, MoEConfig()),
    "debug-moe-every-layer-top1": ("debug", {}, MoEConfig(num_experts=4, top_k=1, moe_every=1)),
    "tiny-dense-mha": ("tiny", {"n_kv_heads": 4}, MoEConfig()),
    "tiny-moe": ("tiny", {}, MoEConfig(num_experts=8, top_k=2, expert_d_ff=192)),
    "tiny-moe-ep2-tasks8": ("tiny", {"max_tasks": 8}, MoEConfig(num_experts=8, top_k=2, ep_size=2)),
    "small-moe-every3": ("small", {}, MoEConfig(num_experts=6, top_k=3, moe_every=3, expert_d_ff=256)),
}


def model_config(name: str, prefix_lm: bool = True) -> ModelConfig:
    size, overrides, moe = MODELS[name]
    return ModelConfig(
        **{**SIZES[size], "size": size, "max_seq_len": 256, "prefix_lm": prefix_lm, **overrides}, moe=moe
    )


def build(cfg: ModelConfig):
    torch.manual_seed(0)
    return build_model(cfg, VOCAB)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_param_counts_match_the_built_decoder(name):
    cfg = model_config(name)
    model = build(cfg)
    counts = count_params(shape_from_config(cfg, VOCAB))
    # param_counts counts over all ranks (experts of other ranks added back), so ep_size 2 counts the same.
    assert (counts.total, counts.active) == param_counts(model.decoder)
    # The shape covers the decoder; the encoders (and modality markers) are a count given beside it.
    encoders = sum(p.numel() for m in (model.vision, model.audio, model.marker_embed) for p in m.parameters())
    with_encoders = count_params(shape_from_config(cfg, VOCAB, encoder_params=encoders))
    assert (with_encoders.total, with_encoders.active) == param_counts(model)
    assert with_encoders.dense == counts.dense + encoders and with_encoders.experts == counts.experts


def test_named_size_with_overrides_equals_explicit_dimensions():
    named = model_shape("tiny", vocab=VOCAB, d_ff=512, num_experts=8)
    explicit = model_shape(vocab=VOCAB, **{**SIZES["tiny"], "d_ff": 512}, num_experts=8)
    assert count_params(named) == count_params(explicit)
    assert named.d_ff == 512 and named.n_layers == SIZES["tiny"]["n_layers"]


MOE = model_shape("1b", vocab=32768, num_experts=16, top_k=2, expert_d_ff=2048)


@pytest.mark.parametrize("gpus", [8, 32])
@pytest.mark.parametrize("ep", [1, 4, 8])
def test_zero_shards_optimizer_states_then_gradients(gpus, ep):
    c = count_params(MOE)
    local = c.dense + c.experts // ep
    z0, z1, z2 = (plan(MOE, gpus=gpus, gpu_mem_gib=80, ep_size=ep, zero_stage=z) for z in (0, 1, 2))
    assert z0.optim_bytes == 12 * local and z0.grad_bytes == 2 * local
    # Dense states shard over all GPUs, expert states over the gpus / ep that hold the same experts:
    # either way a GPU keeps 1/gpus of every parameter's optimizer state.
    assert z1.optim_bytes == math.ceil(12 * c.total / gpus)
    assert z1.grad_bytes == z0.grad_bytes
    assert z2.grad_bytes == math.ceil(2 * c.total / gpus) and z2.optim_bytes == z1.optim_bytes
    assert z0.param_bytes == z1.param_bytes == z2.param_bytes == 2 * local


def test_zero1_divides_dense_optimizer_states_by_the_data_parallel_degree():
    dense = model_shape("1b", vocab=32768)
    one, eight = (plan(dense, gpus=g, gpu_mem_gib=80, zero_stage=1) for g in (1, 8))
    assert one.optim_bytes == 12 * count_params(dense).total
    assert eight.optim_bytes == math.ceil(one.optim_bytes / 8)
    assert "dense" in format_plan(eight) and "all-to-all: none" in format_plan(eight)


def test_ep_size_divides_expert_parameters_only():
    c = count_params(MOE)
    p1, p8 = (plan(MOE, gpus=8, gpu_mem_gib=80, ep_size=ep) for ep in (1, 8))
    assert (p1.expert_params, p8.expert_params) == (c.experts, c.experts // 8)
    assert p1.dense_params == p8.dense_params == c.dense
    assert p1.param_bytes - p8.param_bytes == 2 * (c.experts - c.experts // 8)
    assert p1.activations == p8.activations  # uniform routing: as many routes in as out


def test_precision_sets_bytes_per_parameter():
    c = count_params(MOE)
    bf16 = plan(MOE, gpus=1, gpu_mem_gib=80, precision="bf16")
    fp32 = plan(MOE, gpus=1, gpu_mem_gib=80, precision="fp32")
    assert (bf16.param_bytes, bf16.grad_bytes, bf16.optim_bytes) == (2 * c.total, 2 * c.total, 12 * c.total)
    assert (fp32.param_bytes, fp32.grad_bytes, fp32.optim_bytes) == (4 * c.total, 4 * c.total, 8 * c.total)
    assert fp32.activations.saved > bf16.activations.saved


def test_checkpointing_keeps_block_inputs_and_cuts_activations():
    B, L = 4, 2048
    full = activation_bytes(MOE, micro_batch=B, seq_len=L, prefix_lm=False)
    ckpt = activation_bytes(MOE, micro_batch=B, seq_len=L, prefix_lm=False, checkpointing=True)
    head = B * L * (2 * 2 * MOE.d_model + 8 + 4 * MOE.vocab)
    assert ckpt.saved == MOE.n_layers * B * L * 2 * MOE.d_model + head
    assert ckpt.saved < full.saved / 3 and ckpt.peak < full.peak


def test_activations_grow_linearly_with_the_micro_batch_without_a_prefix_mask():
    one, four = (activation_bytes(MOE, micro_batch=b, seq_len=1024, prefix_lm=False) for b in (1, 4))
    assert four.saved == 4 * one.saved and four.peak == 4 * one.peak
    masked = activation_bytes(MOE, micro_batch=1, seq_len=1024, prefix_lm=True)
    assert masked.saved - one.saved == MOE.n_layers * 2 * 1024 * 1024  # a bf16 [B, 1, L, L] bias per block


def test_scored_fraction_shrinks_only_the_head():
    full = activation_bytes(MOE, micro_batch=2, seq_len=1024, prefix_lm=False)
    tenth = activation_bytes(MOE, micro_batch=2, seq_len=1024, prefix_lm=False, scored_fraction=0.1)
    unscored = round(0.9 * 2 * 1024)
    assert full.saved - tenth.saved == unscored * (2 * 2 * MOE.d_model + 8 + 4 * MOE.vocab)


def test_all_to_all_bytes_count_routes_that_leave_the_gpu():
    T = 4 * 2048
    per_pass = T * 2 * MOE.d_model * 2  # top-2 routes of d_model bf16 values
    assert all_to_all_bytes(MOE, ep_size=1, tokens=T) == 0
    assert all_to_all_bytes(MOE, ep_size=8, tokens=T) == round(MOE.num_moe_layers * 4 * per_pass * 7 / 8)
    assert all_to_all_bytes(MOE, ep_size=8, tokens=T, checkpointing=True) == round(
        MOE.num_moe_layers * 6 * per_pass * 7 / 8
    )
    assert all_to_all_bytes(model_shape("1b"), ep_size=1, tokens=T) == 0
    p = plan(MOE, gpus=16, gpu_mem_gib=80, ep_size=16, micro_batch=4, seq_len=2048)
    assert p.a2a_bytes == round(MOE.num_moe_layers * 4 * per_pass * 15 / 16)


def test_total_is_the_sum_of_its_terms_and_fits_compares_with_the_card():
    p = plan(MOE, gpus=8, gpu_mem_gib=80, ep_size=8, zero_stage=2, micro_batch=4, seq_len=2048)
    alloc = p.param_bytes + p.grad_bytes + p.optim_bytes + p.bucket_bytes + max(p.activations.peak, p.step_bytes)
    assert p.total_bytes == alloc + p.overhead_bytes
    assert p.bucket_bytes == 2 * 500_000_000 * 2  # overlap_comm at stage 2, as configs/ds/gpu_bf16_zero2.json
    assert p.fits == (p.total_bytes <= 80 * GIB)
    tight = plan(
        MOE, gpus=8, gpu_mem_gib=p.total_bytes / GIB * 0.99, ep_size=8, zero_stage=2, micro_batch=4, seq_len=2048
    )
    assert not tight.fits
    text = format_plan(p)
    assert "fits" in text and "all-to-all" in text and f"{p.total_bytes / GIB:.2f}" in text


def test_search_returns_only_fitting_layouts_in_preference_order():
    plans = search(MOE, gpus=16, gpu_mem_gib=16, seq_len=2048)
    assert plans and all(p.fits for p in plans)
    assert [preference(p) for p in plans] == sorted(preference(p) for p in plans)
    every = search(MOE, gpus=16, gpu_mem_gib=10**6, seq_len=2048)
    assert len(every) == 5 * 3 * 6 * 2  # ep 1, 2, 4, 8, 16 x ZeRO 0-2 x 6 micro-batches x checkpointing
    key = lambda p: (p.ep_size, p.zero_stage, p.micro_batch, p.checkpointing)  # noqa: E731
    assert {key(p) for p in plans} == {key(p) for p in every if p.total_bytes <= 16 * GIB}
    best = plans[0]
    assert not best.checkpointing and any(p.checkpointing for p in plans)  # recompute only when nothing else fits
    tokens = lambda p: min(p.micro_batch * p.seq_len, ENOUGH_TOKENS)  # noqa: E731
    plain = [p for p in plans if not p.checkpointing]
    assert tokens(best) == max(tokens(p) for p in plain)
    peers = [p for p in plain if tokens(p) == tokens(best)]
    assert best.a2a_bytes_per_token == min(p.a2a_bytes_per_token for p in peers)
    peers = [p for p in peers if p.a2a_bytes_per_token == best.a2a_bytes_per_token]
    assert best.micro_batch == max(p.micro_batch for p in peers)
    assert best.total_bytes == min(p.total_bytes for p in peers if p.micro_batch == best.micro_batch)
    rows = format_search(plans, limit=3).splitlines()
    assert len(rows) == 4 + 3 + 1 and rows[-1].startswith("...")


def test_search_widens_expert_parallelism_only_when_memory_needs_it():
    wide = model_shape("1b", vocab=32768, num_experts=64, top_k=2, expert_d_ff=2048)  # 5B parameters, 10 GB in bf16
    roomy, tight = (search(wide, gpus=16, gpu_mem_gib=mem, seq_len=2048) for mem in (80, 12))
    assert roomy[0].ep_size == 1
    assert tight and not any(p.ep_size == 1 for p in tight)
    best = tight[0]
    same = [p for p in tight if (p.checkpointing, p.micro_batch) == (best.checkpointing, best.micro_batch)]
    assert best.ep_size == min(p.ep_size for p in same)


def test_search_takes_any_iterables():
    lists = search(MOE, gpus=8, gpu_mem_gib=80, micro_batches=[1, 2], zero_stages=[1, 2], ep_sizes=[2, 8])
    gens = search(MOE, gpus=8, gpu_mem_gib=80, micro_batches=(m for m in (1, 2)), zero_stages=iter((1, 2)),
                  ep_sizes=(e for e in (2, 8)), checkpointing=iter((False, True)))  # fmt: skip
    assert len(gens) == len(lists) == 2 * 2 * 2 * 2 and gens == lists


def test_search_with_nothing_fitting_says_what_to_change():
    assert search(MOE, gpus=1, gpu_mem_gib=1) == []
    assert "no layout fits" in format_search([])


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda: plan(MOE, gpus=8, gpu_mem_gib=80, ep_size=3), ["divisible by ep_size", "1, 2, 4, 8, 16"]),
        (lambda: plan(MOE, gpus=12, gpu_mem_gib=80, ep_size=8), ["must divide the GPU count"]),
        (lambda: plan(MOE, gpus=8, gpu_mem_gib=80, zero_stage=3), ["ZeRO stage 3", "MoE", "0, 1 or 2"]),
        (lambda: plan(model_shape("1b"), gpus=8, gpu_mem_gib=80, zero_stage=3), ["ZeRO stage 3", "0, 1 or 2"]),
        (lambda: plan(model_shape("1b"), gpus=8, gpu_mem_gib=80, ep_size=2), ["dense", "ep_size 1"]),
        (lambda: plan(MOE, gpus=0, gpu_mem_gib=80), ["gpus must be a positive"]),
        (lambda: plan(MOE, gpus=8, gpu_mem_gib=-1), ["gpu_mem_gib must be a positive"]),
        (lambda: plan(MOE, gpus=8, gpu_mem_gib=80, micro_batch=0), ["micro_batch must be a positive"]),
        (lambda: plan(MOE, gpus=8, gpu_mem_gib=80, seq_len=-5), ["seq_len must be a positive"]),
        (lambda: plan(MOE, gpus=8, gpu_mem_gib=80, precision="fp16"), ["precision", "bf16, fp32"]),
        (lambda: model_shape("tiyn"), ["unknown model size", "did you mean 'tiny'"]),
        (lambda: model_shape(d_model=64), ["give n_layers, n_heads, n_kv_heads, d_ff"]),
        (lambda: model_shape("tiny", d_model=0), ["d_model must be a positive"]),
        (lambda: model_shape("tiny", num_experts=4, top_k=5), ["top_k (5) must be at most num_experts (4)"]),
        (lambda: model_shape("tiny", n_heads=3), ["divide by n_heads"]),
        (lambda: model_shape("debug", num_experts=4, moe_every=3), ["no MoE layer"]),
        (lambda: activation_bytes(MOE, micro_batch=1, seq_len=8, scored_fraction=1.5), ["at most 1"]),
    ],
)
def test_bad_input_says_what_to_change(call, words):
    with pytest.raises(ConfigError) as e:
        call()
    for w in words:
        assert w in str(e.value)


def measured_saved_bytes(cfg: ModelConfig, B: int, L: int, checkpointing: bool = False) -> int:
    """Bytes autograd saves in one training forward (loss included) of the built model, on CPU."""
    model = build(cfg).train()
    if checkpointing:
        # The reentrant form saves the block's tensor inputs with save_for_backward, where the hooks see them.
        for block in model.decoder.blocks:
            block.forward = lambda *args, f=block.forward: checkpoint(f, *args, use_reentrant=True)
    batch = synthetic_batch(B, L, VOCAB, 2, torch.device("cpu"), min_len=L)  # targets at L - 1 positions
    return saved_bytes(model, lambda m, _x: forward_loss(m, batch).loss, torch.zeros(1))


# Planner / measured bytes must lie within 3%. The estimate is counted tensor by tensor: measured
# ratios were 0.995-0.999 without checkpointing and 0.988 with it (the rest: small index tensors, the
# RoPE tables); 3% is below one missed or doubled [tokens, d_ff] tensor of these models (about 3.5%)
# and leaves room for torch to save a little more or less between versions. This checks fp32 on CPU
# only: bf16 on a GPU (fp32 router copy, memory-efficient attention) follows the same formula but is
# still to be measured there.
@pytest.mark.parametrize(
    "name,prefix_lm,checkpointing",
    [("tiny-moe", True, False), ("tiny-moe", False, False), ("debug-moe-every-layer-top1", True, False),
     ("tiny-dense-mha", False, False), ("tiny-moe", True, True)],
)  # fmt: skip
def test_activation_estimate_matches_what_autograd_saves(name, prefix_lm, checkpointing):
    B, L = 8, 128
    cfg = model_config(name, prefix_lm)
    measured = measured_saved_bytes(cfg, B, L, checkpointing)
    est = activation_bytes(shape_from_config(cfg, VOCAB), micro_batch=B, seq_len=L, precision="fp32",
                           checkpointing=checkpointing, prefix_lm=prefix_lm, scored_fraction=(L - 1) / L)  # fmt: skip
    assert 0.97 <= est.saved / measured <= 1.03, (est.saved, measured)
    assert est.peak > est.saved


def test_plan_command_prints_the_layout_and_searches(data_dir):
    args = ["--size", "1b", "--experts", "16", "--expert-d-ff", "2048", "--vocab", "32768", "--gpus", "8"]
    res = run_cli(
        ["plan", *args, "--gpu-mem", "80", "--ep-size", "4", "--zero-stage", "2", "--micro-batch", "4"], data_dir
    )
    assert res.returncode == 0, res.stderr
    want = plan(MOE, gpus=8, gpu_mem_gib=80, ep_size=4, zero_stage=2, micro_batch=4, seq_len=2048)
    assert res.stdout.strip() == format_plan(want)
    res = run_cli(["plan", *args, "--gpu-mem", "80", "--search", "--limit", "3"], data_dir)
    assert res.returncode == 0, res.stderr
    best = search(MOE, gpus=8, gpu_mem_gib=80, seq_len=2048)[0]
    assert res.stdout.startswith(format_search(search(MOE, gpus=8, gpu_mem_gib=80, seq_len=2048), limit=3))
    assert res.stdout.rstrip().endswith(format_plan(best))
    res = run_cli(["plan", *args, "--gpu-mem", "80", "--ep-size", "3"], data_dir)
    assert res.returncode == 2 and res.stderr.strip().startswith("pathways-mm: error: num_experts (16) must be")
