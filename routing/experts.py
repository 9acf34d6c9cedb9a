"""The local experts of one MoE layer: SwiGLU weights stacked as [experts, out, in].

Stacked storage feeds grouped GEMM without a per-step copy; the state dict still shows
DeepSpeed's per-expert layout (`deepspeed_experts.{i}.w1.weight`), so DeepSpeed's checkpoint
code writes one file per global expert and either compute path loads the other's checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_NAMES = ("w1", "w2", "w3")  # SwiGLU: w2(silu(w1 x) * w3 x)


class StackedLinear(nn.Module):
    """One bias-free linear map per expert; `weight` is [experts, out, in] (nn.Linear layout)."""

    def __init__(self, num_experts: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_out, d_in))
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init, expert by expert
        nn.init.uniform_(self.weight, -bound, bound)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch._grouped_mm's fast kernel: CUDA sm90+ in bf16; elsewhere a per-expert loop is used."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    )


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

    def grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows of x_ND sorted by local expert, counts_E rows each -> expert outputs [N, D]."""
        use_gmm = grouped_mm_supported(x_ND) if self.use_grouped_mm is None else self.use_grouped_mm
        if use_gmm:
            offs_E = counts_E.cumsum(0).to(torch.int32)  # stays on device: no host sync

            def mm(x, lin):
                return torch._grouped_mm(x, lin.weight.transpose(-2, -1), offs=offs_E)

            return mm(F.silu(mm(x_ND, self.w1)) * mm(x_ND, self.w3), self.w2)
        # unbind, not weight[e]: each select's backward would write a full [E, ...] zero gradient.
        outs = []
        ws = zip(self.w1.weight.unbind(0), self.w3.weight.unbind(0), self.w2.weight.unbind(0))
        for x_nD, (w1, w3, w2) in zip(x_ND.split(counts_E.tolist()), ws):
            outs.append(F.linear(F.silu(F.linear(x_nD, w1)) * F.linear(x_nD, w3), w2))
        return torch.cat(outs)

    def batched(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Equal-size per-expert buffers [local experts, slots, D] -> [local experts, slots, D]."""
        h = F.silu(torch.bmm(x_ECD, self.w1.weight.transpose(1, 2))) * torch.bmm(x_ECD, self.w3.weight.transpose(1, 2))
        return torch.bmm(h, self.w2.weight.transpose(1, 2))


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
