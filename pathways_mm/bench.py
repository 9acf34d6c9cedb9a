"""Micro-benchmarks behind `pathways-mm bench`.

`bench moe`: one MoE FFN layer, forward+backward, against a FLOP-matched dense SwiGLU.
Rows: dense SwiGLU (hidden = top_k * d_ff), PathwaysMoE impl=grouped (dropless, grouped GEMM),
PathwaysMoE impl=deepspeed (capacity buffers), and DeepSpeed's stock `MoE` layer for reference.
Ratio = dense ms / row ms (1.00 = as fast as dense, as in shared/GPU.md). Memory: the bytes
autograd saves for backward per token (parameters excluded, storages counted once) and, on CUDA,
the peak allocated during forward+backward above what was allocated before; "vs dense" = row / dense.

`bench telemetry`: a full DeepSpeed training step of a small MoE decoder with route telemetry
off and on, interleaved round-robin; ratio = on / off (1.00 = free).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, NamedTuple

import torch

CONFIGS = {
    # name: (d_model, d_ff per expert, experts, top_k, tokens, dtype)
    "cpu": (256, 512, 8, 2, 2048, "float32"),
    "h200-a": (1024, 4096, 8, 2, 16384, "bfloat16"),
    "h200-b": (2048, 5632, 16, 2, 16384, "bfloat16"),
    "h200-c": (2048, 1408, 64, 6, 16384, "bfloat16"),
}


class Row(NamedTuple):
    name: str
    ms: float
    saved_bytes: int = 0  # what autograd keeps for backward after the forward (activations)
    peak_bytes: int | None = None  # CUDA: peak allocated during forward+backward, above the start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(steps: list[Callable[[], None]], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Median milliseconds of each step; iterations go round-robin so load on the host hits every row alike."""
    for step in steps:
        for _ in range(warmup):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(iters):
        for step, ts in zip(steps, times):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            ts.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in times]


def _fwd_bwd(layer: torch.nn.Module, call: Callable, x_BLD: torch.Tensor, grad_BLD: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x = x_BLD.detach().requires_grad_()
        call(layer, x).backward(grad_BLD)

    return step


def saved_bytes(layer: torch.nn.Module, call: Callable, x_BLD: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of `layer`.

    Each storage counts once (views of one buffer, a tensor saved by two ops); the layer's
    parameters are left out: they are not activations and do not grow with the tokens.
    """
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    x = x_BLD.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call(layer, x)
    del out
    return sum(sizes.values())


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak bytes allocated during one `step` above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def _layers(d_model, d_ff, num_experts, top_k, capacity):
    from deepspeed.moe.layer import MoE

    from pathways_mm.decoder import SwiGLU
    from pathways_mm.routing import PathwaysMoE

    def ours(impl):
        return PathwaysMoE(d_model, d_ff, num_experts, 1, top_k, impl=impl,
                           capacity_factor=capacity if impl == "deepspeed" else None)  # fmt: skip

    task = {}  # every token belongs to task 0; built lazily for the input's shape and device

    def moe_call(layer, x):
        t = task.setdefault(x.shape, torch.zeros(x.shape[:2], dtype=torch.long, device=x.device))
        out = layer(x, t)
        return out.out + out.aux_loss

    def stock_call(layer, x):
        out, l_aux, _ = layer(x)
        return out + l_aux

    stock = MoE(d_model, SwiGLU(d_model, d_ff), num_experts=num_experts, k=top_k,
                capacity_factor=capacity, eval_capacity_factor=capacity, top2_2nd_expert_sampling=False)  # fmt: skip
    stock.deepspeed_moe.experts.forward = _stock_experts(stock.deepspeed_moe.experts)
    return [
        (f"dense SwiGLU (hidden {top_k}x{d_ff})", SwiGLU(d_model, top_k * d_ff), lambda l, x: l(x).out),
        ("PathwaysMoE grouped (dropless)", ours("grouped"), moe_call),
        (f"PathwaysMoE deepspeed (cap {capacity})", ours("deepspeed"), moe_call),
        (f"DeepSpeed MoE stock (cap {capacity})", stock, stock_call),
    ]


def _stock_experts(experts):
    """DeepSpeed's Experts with our SwiGLU (which returns FFNOutput): keep the tensor only."""

    def forward(inputs):
        chunks = inputs.chunk(experts.num_local_experts, dim=1)
        return torch.cat([e(c).out for c, e in zip(chunks, experts.deepspeed_experts)], dim=1)

    return forward


def run(args: argparse.Namespace) -> list[Row]:
    d_model, d_ff, num_experts, top_k, tokens, dtype = CONFIGS[args.config]
    tokens = args.tokens or tokens
    dtype = getattr(torch, args.dtype or dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_BLD = torch.randn(1, tokens, d_model, device=device, dtype=dtype)
    grad_BLD = torch.randn_like(x_BLD)
    names, steps, mem = [], [], []
    for name, layer, call in _layers(d_model, d_ff, num_experts, top_k, args.capacity):
        if "stock" in name and top_k > 2 and not args.stock_topk:
            continue  # DeepSpeed's top-k gate (k > 2) builds dense [tokens, experts, capacity] masks
        layer = layer.to(device=device, dtype=dtype)
        names.append(name)
        steps.append(_fwd_bwd(layer, call, x_BLD, grad_BLD))
        mem.append((saved_bytes(layer, call, x_BLD), cuda_peak_bytes(steps[-1], device)))
    times = _time(steps, device, args.warmup, args.iters)
    rows = [Row(n, ms, saved, peak) for n, ms, (saved, peak) in zip(names, times, mem)]
    flops = 18 * tokens * d_model * top_k * d_ff  # 3 matmuls x (2 fwd + 4 bwd) FLOPs per multiply-add
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench moe --config {args.config}: d_model={d_model} d_ff={d_ff} experts={num_experts} top_k={top_k} "
          f"tokens={tokens} {str(dtype).replace('torch.', '')} on {dev}; median of {args.iters}, fwd+bwd")  # fmt: skip
    print(f"{'layer':<38} {'ms':>9} {'tokens/s':>12} {'TFLOP/s':>8} {'vs dense':>8}")
    for r in rows:
        print(f"{r.name:<38} {r.ms:9.2f} {tokens / r.ms * 1e3:12,.0f} {flops / r.ms / 1e9:8.2f} {rows[0].ms / r.ms:8.2f}")
    peak_cols = device.type == "cuda"
    print(f"memory per token: saved for backward{', CUDA peak fwd+bwd' if peak_cols else ''}; vs dense = row / dense")
    head = f"{'layer':<38} {'saved KiB/tok':>13} {'vs dense':>8}"
    print(head + (f" {'peak KiB/tok':>12} {'vs dense':>8}" if peak_cols else ""))
    for r in rows:
        line = f"{r.name:<38} {r.saved_bytes / tokens / 1024:13.2f} {r.saved_bytes / rows[0].saved_bytes:8.2f}"
        if peak_cols:
            line += f" {r.peak_bytes / tokens / 1024:12.2f} {r.peak_bytes / rows[0].peak_bytes:8.2f}"
        print(line)
    return rows


TELEMETRY_CONFIGS = {
    # name: (model size, experts, top_k, micro batch, sequence length)
    "cpu": ("tiny", 8, 2, 16, 96),
    "gpu": ("small", 16, 2, 32, 512),
}


def _synthetic_batch(B: int, L: int, vocab: int, num_tasks: int, device: torch.device, min_len: int | None = None):
    """Random tokens with right padding (as collate lays them out), so telemetry skips real padding.

    Lengths are drawn from [min_len, L] (default L // 2); min_len = L gives no padding.
    """
    from pathways_mm.collate import IGNORE, PAD_MODALITY, TEXT, Batch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab, (B, L), generator=g)
    lengths = torch.randint(L // 2 if min_len is None else min_len, L + 1, (B,), generator=g)
    pos = torch.arange(L)[None, :]
    labels = torch.where(pos < lengths[:, None] - 1, tokens.roll(-1, dims=1), IGNORE)
    return Batch(tokens=tokens, task_ids=torch.randint(0, num_tasks, (B,), generator=g),
                 prefix_len=torch.full((B,), 8), lengths=lengths, labels=labels,
                 target_bytes=torch.zeros(B, dtype=torch.long),
                 modality_ids=torch.where(pos < lengths[:, None], TEXT, PAD_MODALITY).expand(B, L).contiguous(),
                 markers=torch.full((B, L), -1)).to(device)  # fmt: skip


def run_telemetry(args: argparse.Namespace) -> dict[str, float]:
    """Median ms of a full training step with telemetry off and on; prints a table with the ratio."""
    import json
    import tempfile

    from pathways_mm import engine as ds_engine
    from pathways_mm.config import SIZES, ExperimentConfig, ModelConfig, MoEConfig, TrainConfig
    from pathways_mm.losses import forward_loss
    from pathways_mm.model import build_model
    from pathways_mm.routing import telemetry

    size, num_experts, top_k, B, L = TELEMETRY_CONFIGS[args.config]
    vocab = 1024
    _, world = ds_engine.init_distributed(args.threads)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "gradient_clipping": 1.0, "steps_per_print": 10**9}, f)  # fmt: skip
    # SIZES applied by hand: only the YAML loader expands `size` into its row.
    model_cfg = ModelConfig(**{**SIZES[size], "size": size, "max_seq_len": max(256, L),
                               "moe": MoEConfig(num_experts=num_experts, top_k=top_k)})  # fmt: skip
    cfg = ExperimentConfig(model=model_cfg, train=TrainConfig(micro_batch_size=B, ds_config=f.name, steps=10**6))
    torch.manual_seed(0)
    engine = ds_engine.initialize(build_model(model_cfg, vocab), cfg, world)
    dev = ds_engine.device()
    batch = _synthetic_batch(B, L, vocab, 2, dev)

    def step() -> None:
        engine.backward(forward_loss(engine, batch).loss)
        engine.step()

    times: dict[str, list[float]] = {"off": [], "on": []}
    counted = 0
    for i in range(args.warmup + args.iters):
        # Round-robin, order flipped every iteration: load on a shared machine hits both alike.
        for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
            telemetry.enable(engine, on=mode == "on")  # outside the timed region
            _sync(dev)
            t0 = time.perf_counter()
            step()
            _sync(dev)
            if i >= args.warmup:
                times[mode].append((time.perf_counter() - t0) * 1e3)
            if mode == "on":
                counted = int(sum(c.token_stats[0].sum() for c in telemetry.read(engine)))
    telemetry.enable(engine)  # whichever mode ran last
    record_ms = _time_record(engine, batch, dev)
    n_moe = telemetry.enable(engine, on=False)
    ms = {mode: statistics.median(ts) for mode, ts in times.items()}
    tokens = int(batch.lengths.sum())
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench telemetry --config {args.config}: {size} decoder, {num_experts} experts top-{top_k} in {n_moe} "
          f"blocks, batch {B}x{L} ({tokens} real tokens) on {where}; median of {args.iters} full training steps "
          f"(forward, backward, optimizer), off/on round-robin; {counted} token-layer counts per step when on")  # fmt: skip
    print(f"{'telemetry':<10} {'ms/step':>9} {'tokens/s':>10}")
    for mode in ("off", "on"):
        print(f"{mode:<10} {ms[mode]:9.2f} {tokens / ms[mode] * 1e3:10,.0f}")
    ratio = ms["on"] / ms["off"]
    print(f"ratio on/off: {ratio:.3f}")
    print(f"telemetry.record alone: {record_ms * 1e3:.0f} us per step, all MoE layers "
          f"({record_ms / ms['off'] * 100:.2f}% of a step without telemetry)")  # fmt: skip
    os.unlink(f.name)
    return {**ms, "ratio": ratio, "counted": counted}


def _time_record(engine, batch, dev: torch.device, reps: int = 50) -> float:
    """Median ms of the counting itself for one forward (every MoE layer), on this batch's real routes.

    The step ratio includes the machine's noise; this isolates what telemetry adds.
    """
    from pathways_mm.routing import telemetry

    layers = [m for m in engine.module.modules() if telemetry.is_tracked(m)]
    x_TD = torch.randn(batch.tokens.numel(), layers[0].router.wg.in_features, device=dev)
    task_T = batch.task_ids[:, None].expand_as(batch.tokens).reshape(-1)
    mods_T = batch.modality_ids.reshape(-1)
    with torch.no_grad():
        route = layers[0].route(x_TD, task_T)
    ts = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        for m in layers:
            telemetry.record(m, route.indices_TK, route.probs_TE, task_T, mods_T)
        _sync(dev)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _add_telemetry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", choices=sorted(TELEMETRY_CONFIGS), default="cpu", help="model and batch size")
    p.add_argument("--iters", type=int, default=30, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = one process's share of the cores)")


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu", help="layer sizes (GPU ones from shared/GPU.md)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (default: the config's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--capacity", type=float, default=1.25, help="capacity factor of the capacity-based rows")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--stock-topk", action="store_true", help="also time DeepSpeed's stock gate for top_k > 2")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench moe`, `bench telemetry` and `bench train` to the CLI's subparsers; the chosen command is in `args.func`."""
    bench = subparsers.add_parser("bench", help="micro-benchmarks")
    kinds = bench.add_subparsers(dest="bench", required=True)
    moe = kinds.add_parser("moe", help="one MoE FFN layer vs a FLOP-matched dense FFN")
    _add_args(moe)
    moe.set_defaults(func=_cli_run)
    tel = kinds.add_parser("telemetry", help="a full training step with route telemetry on vs off")
    _add_telemetry_args(tel)
    tel.set_defaults(func=_cli_telemetry)
    from pathways_mm.bench_train import add_train_parser

    add_train_parser(kinds)
    return bench


def run_single_process(bench: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """A bench that builds a DeepSpeed engine, as one process without a launcher; user errors exit 2."""
    from pathways_mm.cli import run_guarded
    from pathways_mm.engine import setup_single_process_env, shutdown

    def go() -> None:
        setup_single_process_env()
        bench(args)
        shutdown()

    return run_guarded(go)


def _cli_telemetry(args: argparse.Namespace) -> int:
    return run_single_process(run_telemetry, args)


def _cli_run(args: argparse.Namespace) -> int:
    run(args)
    return 0  # the CLI's exit status


def bench_telemetry(argv: list[str] | None = None) -> dict[str, float]:
    """`pathways-mm bench telemetry [options]` without the CLI around it."""
    p = argparse.ArgumentParser(prog="pathways-mm bench telemetry")
    _add_telemetry_args(p)
    return run_telemetry(p.parse_args(argv))


def bench_moe(argv: list[str] | None = None) -> list[Row]:
    """`pathways-mm bench moe [options]` without the CLI around it."""
    p = argparse.ArgumentParser(prog="pathways-mm bench moe", description=__doc__.splitlines()[0])
    _add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    bench_moe()
