"""`pathways-mm bench moe`: one MoE FFN layer, forward+backward, against a FLOP-matched dense SwiGLU.

Rows: dense SwiGLU (hidden = top_k * d_ff), PathwaysMoE impl=grouped (dropless, grouped GEMM),
PathwaysMoE impl=deepspeed (capacity buffers), DeepSpeed's stock `MoE` layer, and on CUDA sm90+
in bf16 a plain sort + torch._grouped_mm layer (`SortGroupedMM`: no tasks, no telemetry), the
floor what PathwaysMoE adds sits on.
Ratio = dense ms / row ms (1.00 = as fast as dense). Memory: the bytes autograd saves for
backward per token (parameters excluded, storages counted once) and, on CUDA, the peak allocated
during forward+backward above what was allocated before; "vs dense" = row / dense.

Shape suffixes: B batch (1), L tokens, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn

from pathways_mm.bench.common import where, write_json
from pathways_mm.model.layers import SwiGLU
from pathways_mm.routing import PathwaysMoE
from pathways_mm.routing.experts import StackedLinear, grouped_mm_supported
from pathways_mm.runtime.timing import median_ms, time_round_robin

CONFIGS = {
    # name: (d_model, d_ff per expert, experts, top_k, tokens, dtype)
    "cpu": (256, 512, 8, 2, 2048, "float32"),
    "h200-a": (1024, 4096, 8, 2, 16384, "bfloat16"),
    "h200-b": (2048, 5632, 16, 2, 16384, "bfloat16"),
    "h200-c": (2048, 1408, 64, 6, 16384, "bfloat16"),
}


REFERENCE = "sort + torch._grouped_mm (reference)"


class Row(NamedTuple):
    name: str
    ms: float
    saved_bytes: int = 0  # what autograd keeps for backward after the forward (activations)
    peak_bytes: int | None = None  # CUDA: peak allocated during forward+backward, above the start


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


class SortGroupedMM(nn.Module):
    """The reference MoE FFN: softmax top-k router, sort routes by expert, SwiGLU experts through
    torch._grouped_mm, weighted sum back in token order. CUDA sm90+ in bf16 only.

    Shape suffixes: T tokens, D d_model, E experts, K routes per token, N routes (T*K).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.w1 = StackedLinear(num_experts, d_model, d_ff)
        self.w3 = StackedLinear(num_experts, d_model, d_ff)
        self.w2 = StackedLinear(num_experts, d_ff, d_model)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BLD.reshape(-1, x_BLD.shape[-1])
        weights_TK, expert_TK = self.gate(x_TD).float().softmax(-1).topk(self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        expert_N = expert_TK.reshape(-1)
        order_N = expert_N.argsort(stable=True)
        counts_E = torch.zeros(self.w1.weight.shape[0], dtype=torch.long, device=x_TD.device)
        offs_E = counts_E.index_add_(0, expert_N, torch.ones_like(expert_N)).cumsum(0).to(torch.int32)

        def mm(x, lin):
            return torch._grouped_mm(x, lin.weight.transpose(-2, -1), offs=offs_E)

        x_ND = x_TD.index_select(0, order_N // self.top_k)
        y_ND = mm(F.silu(mm(x_ND, self.w1)) * mm(x_ND, self.w3), self.w2)
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(order_N.numel(), device=x_TD.device)
        y_NKD = (y_ND.index_select(0, inverse_N) * weights_TK.reshape(-1, 1).to(y_ND.dtype)).view(*expert_TK.shape, -1)
        return y_NKD.sum(1).view_as(x_BLD)


def _layers(d_model, d_ff, num_experts, top_k, capacity):
    def ours(impl):
        return PathwaysMoE(
            d_model, d_ff, num_experts, 1, top_k, impl=impl, capacity_factor=capacity if impl == "deepspeed" else None
        )

    task = {}  # every token belongs to task 0; built lazily for the input's shape and device

    def moe_call(layer, x):
        t = task.setdefault(x.shape, torch.zeros(x.shape[:2], dtype=torch.long, device=x.device))
        out = layer(x, t)
        return out.out + out.aux_loss

    def stock_call(layer, x):
        out, l_aux, _ = layer(x)
        return out + l_aux

    stock = MoE(
        d_model,
        SwiGLU(d_model, d_ff),
        num_experts=num_experts,
        k=top_k,
        capacity_factor=capacity,
        eval_capacity_factor=capacity,
        top2_2nd_expert_sampling=False,
    )
    stock.deepspeed_moe.experts.forward = _stock_experts(stock.deepspeed_moe.experts)
    return [
        (f"dense SwiGLU (hidden {top_k}x{d_ff})", SwiGLU(d_model, top_k * d_ff), lambda layer, x: layer(x).out),
        ("PathwaysMoE grouped (dropless)", ours("grouped"), moe_call),
        (f"PathwaysMoE deepspeed (cap {capacity})", ours("deepspeed"), moe_call),
        (f"DeepSpeed MoE stock (cap {capacity})", stock, stock_call),
        (REFERENCE, SortGroupedMM(d_model, d_ff, num_experts, top_k), lambda layer, x: layer(x)),
    ]


def _stock_experts(experts):
    """DeepSpeed's Experts with our SwiGLU (which returns FFNOutput): keep the tensor only."""

    def forward(inputs):
        chunks = inputs.chunk(experts.num_local_experts, dim=1)
        return torch.cat([e(c).out for c, e in zip(chunks, experts.deepspeed_experts)], dim=1)

    return forward


def run_moe(
    config: str = "cpu",
    *,
    tokens: int | None = None,
    dtype: str | None = None,
    iters: int = 10,
    warmup: int = 3,
    capacity: float = 1.25,
    device: str | None = None,
    threads: int = 0,
    stock_topk: bool = False,
    json_out: str | None = None,
) -> list[Row]:
    """Time every row of one layer config in the same run; print the speed and memory tables
    (and with `json_out`, write the rows there)."""
    d_model, d_ff, num_experts, top_k, default_tokens, default_dtype = CONFIGS[config]
    tokens = tokens or default_tokens
    dtype = getattr(torch, dtype or default_dtype)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    x_BLD = torch.randn(1, tokens, d_model, device=device, dtype=dtype)
    grad_BLD = torch.randn_like(x_BLD)
    names, steps, mem, skipped = [], [], [], []
    for name, layer, call in _layers(d_model, d_ff, num_experts, top_k, capacity):
        if "stock" in name and top_k > 2 and not stock_topk:
            skipped.append(f"{name}: DeepSpeed's top-k gate (k > 2) builds dense [tokens, experts, capacity] masks")
            continue
        if name == REFERENCE and not grouped_mm_supported(x_BLD):
            skipped.append(f"{name}: torch._grouped_mm needs CUDA sm90+ in bf16")
            continue
        layer = layer.to(device=device, dtype=dtype)
        names.append(name)
        steps.append(_fwd_bwd(layer, call, x_BLD, grad_BLD))
        mem.append((saved_bytes(layer, call, x_BLD), cuda_peak_bytes(steps[-1], device)))
    times = median_ms(time_round_robin(steps, device, warmup, iters))
    rows = [Row(n, ms, saved, peak) for n, ms, (saved, peak) in zip(names, times, mem)]
    flops = 18 * tokens * d_model * top_k * d_ff  # 3 matmuls x (2 fwd + 4 bwd) FLOPs per multiply-add
    print(
        f"bench moe --config {config}: d_model={d_model} d_ff={d_ff} experts={num_experts} top_k={top_k} "
        f"tokens={tokens} {str(dtype).replace('torch.', '')} on {where(device)}; median of {iters}, fwd+bwd"
    )
    print(f"{'layer':<38} {'ms':>9} {'tokens/s':>12} {'TFLOP/s':>8} {'vs dense':>8}")
    for r in rows:
        print(
            f"{r.name:<38} {r.ms:9.2f} {tokens / r.ms * 1e3:12,.0f} {flops / r.ms / 1e9:8.2f} {rows[0].ms / r.ms:8.2f}"
        )
    for why in skipped:
        print(f"skipped {why}")
    peak_cols = device.type == "cuda"
    print(f"memory per token: saved for backward{', CUDA peak fwd+bwd' if peak_cols else ''}; vs dense = row / dense")
    head = f"{'layer':<38} {'saved KiB/tok':>13} {'vs dense':>8}"
    print(head + (f" {'peak KiB/tok':>12} {'vs dense':>8}" if peak_cols else ""))
    for r in rows:
        line = f"{r.name:<38} {r.saved_bytes / tokens / 1024:13.2f} {r.saved_bytes / rows[0].saved_bytes:8.2f}"
        if peak_cols:
            line += f" {r.peak_bytes / tokens / 1024:12.2f} {r.peak_bytes / rows[0].peak_bytes:8.2f}"
        print(line)
    if json_out:
        shape = {"d_model": d_model, "d_ff": d_ff, "num_experts": num_experts, "top_k": top_k, "tokens": tokens}
        info = {"config": config, **shape, "dtype": str(dtype), "device": where(device), "iters": iters}
        write_json(json_out, {**info, "flops": flops, "rows": [r._asdict() for r in rows], "skipped": skipped})
    return rows
