"""The local experts of one MoE layer: SwiGLU weights stacked as [experts, out, in].

Stacked storage feeds grouped GEMM without a per-step copy; the state dict still shows
DeepSpeed's per-expert layout (`deepspeed_experts.{i}.w1.weight`), so DeepSpeed's checkpoint
code writes one file per global expert and either compute path loads the other's checkpoints.

Shape suffixes: N rows (grouped by expert), D d_model, F expert hidden size, E local experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

WEIGHT_NAMES = ("w1", "w2", "w3")  # SwiGLU: w2(silu(w1 x) * w3 x)


class StackedLinear(nn.Module):
    """One bias-free linear map per expert; `weight` is [experts, out, in] (nn.Linear layout)."""

    def __init__(self, num_experts: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_out, d_in))
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init, expert by expert
        nn.init.uniform_(self.weight, -bound, bound)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch._grouped_mm's fast kernel: CUDA sm90+ in bf16; elsewhere a per-expert loop is used.

    torch 2.11 has a CPU _grouped_mm, but it is no faster than the loop (a loop of mm itself:
    8.00 vs 7.90 ms for 8 x [512, 256] @ [256, 512], 1 thread) and its backward fails there.
    """
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    )


class SharedExpert(nn.Module):
    """A dense SwiGLU that every token of an MoE layer passes through, beside the routed experts
    (DeepSeekMoE's shared expert). Trunk: no expert tags, never masked, kept by every export."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))


class GroupedExperts(nn.Module):
    """`num_local_experts` SwiGLU experts with stacked weights tagged for DeepSpeed's expert groups.

    use_grouped_mm: None picks torch._grouped_mm where `grouped_mm_supported`; True/False forces it.
    """

    def __init__(
        self,
        num_local_experts: int,
        d_model: int,
        d_ff: int,
        group_name: str,
        use_grouped_mm: bool | None = None,
    ):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.use_grouped_mm = use_grouped_mm
        self.w1 = StackedLinear(num_local_experts, d_model, d_ff)
        self.w3 = StackedLinear(num_local_experts, d_model, d_ff)
        self.w2 = StackedLinear(num_local_experts, d_ff, d_model)
        for p in self.parameters():
            # DeepSpeed's tags: no data-parallel all-reduce; reduced over the expert-data group instead.
            p.allreduce = False
            p.group_name = group_name
        self.register_state_dict_post_hook(_split_experts)
        self.register_load_state_dict_pre_hook(_stack_experts)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows of x_ND grouped by local expert, counts_E rows each -> expert outputs [N, D]."""
        use_gmm = grouped_mm_supported(x_ND) if self.use_grouped_mm is None else self.use_grouped_mm
        if use_gmm:
            offs_E = counts_E.cumsum(0).to(torch.int32)  # stays on device: no host sync

            def mm(x, lin):
                return torch._grouped_mm(x, lin.weight.transpose(-2, -1), offs=offs_E)

            return mm(F.silu(mm(x_ND, self.w1)) * mm(x_ND, self.w3), self.w2)
        bounds = [0, *counts_E.cumsum(0).tolist()]  # the loop needs row counts on the host
        return _SwiGLULoop.apply(x_ND, self.w1.weight, self.w3.weight, self.w2.weight, bounds)


class _SwiGLULoop(torch.autograd.Function):
    """Per-expert SwiGLU over rows grouped by expert, with a hand-written backward.

    Why not autograd over a loop of F.linear: unbind's backward stacks E gradients and the
    outputs are cat'ed (both copies of everything); autograd saves silu(h1) and the product as
    well as h1 and h3. Here every GEMM writes into one preallocated buffer (out=), gradients go
    straight into [E, ...] tensors, the elementwise ops run once over all rows, and backward
    keeps only x, h1 and h3 (silu and the product are recomputed: cheap next to the GEMMs).
    bounds: E + 1 row offsets (host ints) of each expert's rows in x_ND.
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EFD, w3_EFD, w2_EDF, bounds: list[int]):
        N, F_ = x_ND.shape[0], w1_EFD.shape[1]
        x_ND = x_ND.contiguous()
        h1_NF, h3_NF = x_ND.new_empty(N, F_), x_ND.new_empty(N, F_)
        y_ND = x_ND.new_empty(N, w2_EDF.shape[1])
        spans = _spans(bounds)
        for e, s, t in spans:
            torch.mm(x_ND[s:t], w1_EFD[e].t(), out=h1_NF[s:t])
            torch.mm(x_ND[s:t], w3_EFD[e].t(), out=h3_NF[s:t])
        h_NF = F.silu(h1_NF).mul_(h3_NF)
        for e, s, t in spans:
            torch.mm(h_NF[s:t], w2_EDF[e].t(), out=y_ND[s:t])
        ctx.save_for_backward(x_ND, w1_EFD, w3_EFD, w2_EDF, h1_NF, h3_NF)
        ctx.spans = spans
        return y_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ND):
        x_ND, w1_EFD, w3_EFD, w2_EDF, h1_NF, h3_NF = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        g_ND = g_ND.contiguous()
        a_NF = F.silu(h1_NF)
        gw1, gw3, gw2 = (
            _weight_grad(w, ctx.spans) if need else None
            for w, need in ((w1_EFD, need_w1), (w3_EFD, need_w3), (w2_EDF, need_w2))
        )
        gh_NF = h1_NF.new_empty(h1_NF.shape)
        for e, s, t in ctx.spans:
            torch.mm(g_ND[s:t], w2_EDF[e], out=gh_NF[s:t])
        if need_w2:
            h_NF = a_NF * h3_NF
            for e, s, t in ctx.spans:
                torch.mm(g_ND[s:t].t(), h_NF[s:t], out=gw2[e])
            del h_NF
        gh3_NF = a_NF.mul_(gh_NF)
        gh1_NF = torch.ops.aten.silu_backward(gh_NF.mul_(h3_NF), h1_NF)
        del gh_NF
        gx_ND = torch.empty_like(x_ND) if need_x else None
        for e, s, t in ctx.spans:
            if need_w1:
                torch.mm(gh1_NF[s:t].t(), x_ND[s:t], out=gw1[e])
            if need_w3:
                torch.mm(gh3_NF[s:t].t(), x_ND[s:t], out=gw3[e])
            if need_x:
                torch.mm(gh1_NF[s:t], w1_EFD[e], out=gx_ND[s:t])
                gx_ND[s:t].addmm_(gh3_NF[s:t], w3_EFD[e])
        return gx_ND, gw1, gw3, gw2, None


def _weight_grad(w_E__: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """An empty [E, ...] gradient whose idle experts are zero (the GEMMs overwrite the others)."""
    g = torch.empty_like(w_E__)
    active = {e for e, _, _ in spans}
    for e in range(g.shape[0]):
        if e not in active:
            g[e].zero_()
    return g


def _spans(bounds: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert that got rows; idle experts keep zero gradients."""
    return [(e, s, t) for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])) if t > s]


def _split_experts(module: GroupedExperts, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name in WEIGHT_NAMES:
        stacked = state_dict.pop(f"{prefix}{name}.weight")
        for i in range(module.num_local_experts):
            state_dict[f"{prefix}deepspeed_experts.{i}.{name}.weight"] = stacked[i].detach()


def _stack_experts(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for name in WEIGHT_NAMES:
        keys = [f"{prefix}deepspeed_experts.{i}.{name}.weight" for i in range(module.num_local_experts)]
        present = [k for k in keys if k in state_dict]
        if not present:
            continue  # already stacked (or missing: load_state_dict reports the stacked key)
        if len(present) != len(keys):
            error_msgs.append(
                f"{prefix}: per-expert {name} weights for {len(present)} of {len(keys)} local experts; "
                f"missing {sorted(set(keys) - set(present))[:3]} (checkpoint saved with other num_experts?)"
            )
            continue
        state_dict[f"{prefix}{name}.weight"] = torch.stack([state_dict.pop(k) for k in keys])
    # Leftover per-expert keys (a checkpoint from a larger layer) are reported as unexpected by torch.
