"""`pathways-mm bench telemetry`: a full DeepSpeed training step of a small MoE decoder with route
telemetry off and on, interleaved round-robin; ratio = on / off (1.00 = free).

Shape suffixes: T tokens, D d_model, E experts, K routes per token.
"""

from __future__ import annotations

import torch

from pathways_mm.bench.common import ds_config_file, synthetic_batch, where
from pathways_mm.config import ExperimentConfig, ModelConfig, MoEConfig, TrainConfig
from pathways_mm.model.model import build_model
from pathways_mm.routing import moe_layers, telemetry
from pathways_mm.runtime import engine as ds_engine
from pathways_mm.runtime.timing import median_ms, time_round_robin
from pathways_mm.training.losses import forward_loss

TELEMETRY_CONFIGS = {
    # name: (model size, experts, top_k, micro batch, sequence length)
    "cpu": ("tiny", 8, 2, 16, 96),
    "gpu": ("small", 16, 2, 32, 512),
}


def run_telemetry(config: str = "cpu", *, iters: int = 30, warmup: int = 3, threads: int = 0) -> dict[str, float]:
    """Median ms of a full training step with telemetry off and on; prints a table with the ratio."""
    size, num_experts, top_k, B, L = TELEMETRY_CONFIGS[config]
    vocab = 1024
    _, world = ds_engine.init_distributed(threads)
    model_cfg = ModelConfig(size=size, max_seq_len=max(256, L), moe=MoEConfig(num_experts=num_experts, top_k=top_k))
    torch.manual_seed(0)
    with ds_config_file() as ds_path:
        cfg = ExperimentConfig(model=model_cfg, train=TrainConfig(micro_batch_size=B, ds_config=ds_path, steps=10**6))
        engine = ds_engine.initialize(build_model(model_cfg, vocab), cfg, world)
    dev = ds_engine.device()
    batch = synthetic_batch(B, L, vocab, 2, dev)

    def step() -> None:
        engine.backward(forward_loss(engine, batch).loss)
        engine.step()

    setup = [lambda: telemetry.enable(engine, on=False), lambda: telemetry.enable(engine, on=True)]
    ms_off, ms_on = median_ms(time_round_robin([step, step], dev, warmup, iters, setup=setup, alternate=True))
    telemetry.enable(engine)
    step()
    counted = int(sum(c.token_stats[0].sum() for c in telemetry.read(engine)))
    record_ms = _time_record(engine, batch, dev)
    n_moe = telemetry.enable(engine, on=False)
    tokens = int(batch.lengths.sum())
    print(
        f"bench telemetry --config {config}: {size} decoder, {num_experts} experts top-{top_k} in {n_moe} "
        f"blocks, batch {B}x{L} ({tokens} real tokens) on {where(dev)}; median of {iters} full training steps "
        f"(forward, backward, optimizer), off/on round-robin; {counted} token-layer counts per step when on"
    )
    print(f"{'telemetry':<10} {'ms/step':>9} {'tokens/s':>10}")
    for mode, ms in (("off", ms_off), ("on", ms_on)):
        print(f"{mode:<10} {ms:9.2f} {tokens / ms * 1e3:10,.0f}")
    ratio = ms_on / ms_off
    print(f"ratio on/off: {ratio:.3f}")
    print(
        f"telemetry.record alone: {record_ms * 1e3:.0f} us per step, all MoE layers "
        f"({record_ms / ms_off * 100:.2f}% of a step without telemetry)"
    )
    return {"off": ms_off, "on": ms_on, "ratio": ratio, "counted": counted}


def _time_record(engine, batch, dev: torch.device, reps: int = 50) -> float:
    """Median ms of the counting itself for one forward (every MoE layer), on this batch's real routes.

    The step ratio includes the machine's noise; this isolates what telemetry adds.
    """
    layers = [m for _, m in moe_layers(engine.module)]
    telemetry.enable(engine)
    x_TD = torch.randn(batch.tokens.numel(), layers[0].router.wg.in_features, device=dev)
    task_T = batch.task_ids[:, None].expand_as(batch.tokens).reshape(-1)
    mods_T = batch.modality_ids.reshape(-1)
    with torch.no_grad():
        route = layers[0].route(x_TD, task_T)

    def record() -> None:
        for m in layers:
            telemetry.record(m, route.indices_TK, route.probs_TE, task_T, mods_T)

    (ms,) = median_ms(time_round_robin([record], dev, 0, reps))
    return ms
