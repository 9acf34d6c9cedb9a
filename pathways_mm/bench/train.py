"""`pathways-mm bench train`: full DeepSpeed training steps (forward, backward, optimizer) on
synthetic batches, for the sparse model and, with --dense, the same decoder without experts
and with a FLOP-matched d_ff (top_k x expert d_ff), so the sparse/dense ratio comes from one run.

MFU counts active parameters (PaLM's formula): 6 x active params x tokens + attention
12 x layers x d_model x sequence length x tokens, over the card's bf16 dense peak (PEAK_TFLOPS)
or --peak-tflops; n/a without either (a CPU). Peak memory: CUDA max_memory_allocated over the
row's steps (the other row's model freed first); on a CPU the process's peak RSS so far, which
never goes down, so the smaller (dense) model runs first.
"""

from __future__ import annotations

import gc
import resource
from typing import NamedTuple

import torch

from pathways_mm.bench.common import ds_config_file, synthetic_batch, where, write_json
from pathways_mm.config import ExperimentConfig, ModelConfig, MoEConfig, TrainConfig
from pathways_mm.model.model import build_model, param_counts
from pathways_mm.runtime import engine as ds_engine
from pathways_mm.runtime.timing import median_ms, time_round_robin
from pathways_mm.training.losses import forward_loss

TRAIN_CONFIGS = {
    # name: (size, experts, top_k, expert d_ff, micro batch, sequence length, vocab, dtype)
    "cpu": ("tiny", 8, 2, 192, 8, 128, 1024, "float32"),
    # 1b: d_model 1536, 16 blocks, MoE in every second block: 8 experts of d_ff 2048 (top-2 of
    # them match the dense d_ff 4096), about 0.9B parameters in all, 0.4B active.
    "1b": ("1b", 8, 2, 2048, 4, 2048, 32768, "bfloat16"),
}
PEAK_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H200": 989.0}  # bf16 dense, by device name


class TrainRow(NamedTuple):
    name: str
    total_params: int
    active_params: int
    ms: float  # median ms per step
    tokens: int  # tokens per step (every position computed)
    flops: float  # model FLOPs per step on active parameters
    peak_bytes: int


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def step_flops(active_params: int, n_layers: int, d_model: int, B: int, L: int) -> float:
    """Training FLOPs of one step: 6 N per token plus attention (scores and values, fwd + bwd)."""
    return (6 * active_params + 12 * n_layers * d_model * L) * B * L


def model_config(config: str, dense: bool, seq_len: int | None = None) -> ModelConfig:
    size, num_experts, top_k, expert_d_ff, _, L, _, _ = TRAIN_CONFIGS[config]
    max_seq_len = max(256, seq_len or L)
    if dense:
        return ModelConfig(size=size, max_seq_len=max_seq_len, d_ff=top_k * expert_d_ff)
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, expert_d_ff=expert_d_ff)
    return ModelConfig(size=size, max_seq_len=max_seq_len, moe=moe)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _run_row(config: str, dense: bool, world: int, ds_path: str, B: int, L: int, warmup: int, iters: int) -> TrainRow:
    vocab = TRAIN_CONFIGS[config][6]
    model_cfg = model_config(config, dense, L)
    cfg = ExperimentConfig(model=model_cfg, train=TrainConfig(micro_batch_size=B, ds_config=ds_path, steps=10**6))
    torch.manual_seed(0)
    model = build_model(model_cfg, vocab)
    total, active = param_counts(model.decoder)  # the encoders do not run on text batches
    engine = ds_engine.initialize(model, cfg, world)
    dev = ds_engine.device()
    batch = synthetic_batch(B, L, vocab, 2, dev, min_len=L)

    def step() -> None:
        engine.backward(forward_loss(engine, batch).loss)
        engine.step()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    (ms,) = median_ms(time_round_robin([step], dev, 0, iters))
    peak = _peak_bytes(dev)
    name = (
        "dense (FLOP-matched d_ff)" if dense else f"MoE {model_cfg.moe.num_experts} experts top-{model_cfg.moe.top_k}"
    )
    flops = step_flops(active, model_cfg.n_layers, model_cfg.d_model, B, L)
    engine = model = step = None  # free this row's model before the next one is built
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return TrainRow(name, total, active, ms, B * L, flops, peak)


def run_train(
    config: str = "cpu",
    *,
    iters: int = 10,
    warmup: int = 2,
    batch: int | None = None,
    seq_len: int | None = None,
    dense: bool = False,
    peak_tflops_override: float | None = None,
    threads: int = 0,
    json_out: str | None = None,
) -> list[TrainRow]:
    """Time full training steps of each row; print the table (and the sparse/dense ratio); with
    `json_out`, write the rows there."""
    size, num_experts, top_k, expert_d_ff, B, L, vocab, dtype = TRAIN_CONFIGS[config]
    B, L = batch or B, seq_len or L
    _, world = ds_engine.init_distributed(threads)
    with ds_config_file({"bf16": {"enabled": True}} if dtype == "bfloat16" else None) as ds_path:
        rows = [_run_row(config, d, world, ds_path, B, L, warmup, iters) for d in ([True, False] if dense else [False])]
    dev = ds_engine.device()
    peak = peak_tflops(dev, peak_tflops_override)
    mem = "CUDA max_memory_allocated" if dev.type == "cuda" else "process peak RSS so far"
    print(
        f"bench train --config {config}: {size} decoder, MoE every 2nd block ({num_experts} experts of "
        f"d_ff {expert_d_ff}, top-{top_k}), batch {B}x{L}, vocab {vocab}, {dtype} on {where(dev)}; median of "
        f"{iters} full training steps (forward, backward, optimizer); MFU on active parameters"
        f"{f' over {peak:g} TFLOP/s' if peak else ''}; peak memory = {mem}"
    )
    print(
        f"{'model':<28} {'params':>8} {'active':>8} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'peak GiB':>9}"
    )
    for r in rows:
        tflops = r.flops / r.ms / 1e9
        mfu = f"{tflops / peak:6.1%}" if peak else f"{'n/a':>6}"
        print(
            f"{r.name:<28} {r.total_params / 1e6:7.1f}M {r.active_params / 1e6:7.1f}M {r.ms:9.2f} "
            f"{r.tokens / r.ms * 1e3:10,.0f} {tflops:8.3f} {mfu} {r.peak_bytes / 2**30:9.2f}"
        )
    if len(rows) == 2:
        print(f"sparse/dense time per step: {rows[1].ms / rows[0].ms:.3f}")
    if json_out:
        info = {"config": config, "size": size, "batch": B, "seq_len": L, "vocab": vocab, "dtype": dtype}
        write_json(json_out, {**info, "device": where(dev), "peak_tflops": peak, "rows": [r._asdict() for r in rows]})
    return rows
