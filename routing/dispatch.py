"""Token dispatch and combine for the two MoE compute paths.

DroplessDispatch ("grouped"): sort routes by expert, all-to-all with uneven splits, compute on
variable-size groups, un-permute. CapacityDispatch ("deepspeed"): DeepSpeed's fixed-capacity
[experts, capacity, D] buffers, filled by DeepSpeed's own sparse encode/decode from our routes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from deepspeed.moe.sharded_moe import _AllToAll, _route_slots, _sparse_decode, _sparse_encode

from pathways_mm.routing.router import RouterOutput


class _AllToAllUneven(torch.autograd.Function):
    """all_to_all_single with per-rank split sizes; backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx: Any, x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_ND: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAllUneven.apply(grad_ND, in_splits, out_splits, ctx.group), None, None, None


def _inverse(perm_N: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm_N)
    inv[perm_N] = torch.arange(perm_N.numel(), device=perm_N.device)
    return inv


class DroplessPlan(NamedTuple):
    order_N: torch.Tensor  # [tokens*k] routes sorted by global expert
    counts_E: torch.Tensor  # [local experts] rows per local expert after the exchange
    in_splits: list[int] | None  # rows sent to each rank (None: no exchange)
    out_splits: list[int] | None  # rows received from each rank
    regroup_R: torch.Tensor | None  # received rows (ordered by source rank) -> grouped by local expert


class DroplessDispatch:
    """Every route is computed: variable-size expert groups, uneven all-to-all when ep_size > 1."""

    def __init__(self, num_experts: int, ep_size: int):
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local = num_experts // ep_size

    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput, group) -> tuple[torch.Tensor, DroplessPlan]:
        k = route.indices_TK.shape[1]
        expert_N = route.indices_TK.reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)
        # index_select, not x_TD[...]: its backward is one index_add_, advanced indexing's an
        # accumulating index_put (a sort of the indices on CPU).
        x_ND = x_TD.index_select(0, order_N // k)
        # index_add_, not bincount: bincount on CUDA reads the max back to the host.
        counts_E = torch.zeros(self.num_experts, dtype=torch.long, device=x_TD.device)
        counts_E.index_add_(0, expert_N, torch.ones_like(expert_N))
        if self.ep_size == 1:
            return x_ND, DroplessPlan(order_N, counts_E, None, None, None)
        # Exchange counts first: every rank learns how many rows it gets for each local expert.
        recv_counts_RE = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts_RE, counts_E, group=group)
        recv_counts_RE = recv_counts_RE.view(self.ep_size, self.num_local)  # [source rank, local expert]
        splits = torch.stack([counts_E.view(self.ep_size, self.num_local).sum(1), recv_counts_RE.sum(1)]).tolist()
        in_splits, out_splits = splits
        x_RD = _AllToAllUneven.apply(x_ND, out_splits, in_splits, group)
        local_e = torch.arange(self.num_local, device=x_TD.device).repeat(self.ep_size)
        regroup_R = torch.argsort(torch.repeat_interleave(local_e, recv_counts_RE.reshape(-1)), stable=True)
        plan = DroplessPlan(order_N, recv_counts_RE.sum(0), in_splits, out_splits, regroup_R)
        return x_RD.index_select(0, regroup_R), plan

    def combine(self, y_ND: torch.Tensor, plan: DroplessPlan, route: RouterOutput, group) -> torch.Tensor:
        if plan.regroup_R is not None:
            y_ND = y_ND.index_select(0, _inverse(plan.regroup_R))
            y_ND = _AllToAllUneven.apply(y_ND, plan.in_splits, plan.out_splits, group)
        T, k = route.indices_TK.shape
        # Weight each route's row, un-permute with a gather (the inverse of a permutation), sum
        # the k rows of a token. Not index_add_: its autograd saves the whole [N, D] source.
        # Weights are float32, so the sum over the k routes accumulates in float32.
        weights_N1 = route.weights_TK.reshape(-1).index_select(0, plan.order_N)[:, None]
        y_TKD = (y_ND * weights_N1).index_select(0, _inverse(plan.order_N)).view(T, k, -1)
        return y_TKD.sum(1).to(y_ND.dtype)


class CapacityPlan(NamedTuple):
    slots_KT: torch.Tensor  # [k, tokens] flat slot in the [experts * capacity] buffer (scratch if dropped)
    gates_KT: torch.Tensor  # [k, tokens] float32 combine weights, 0 for dropped routes
    capacity: int
    num_dropped: torch.Tensor  # scalar, routes over capacity
    dropped_KT: torch.Tensor  # [k, tokens] bool, True where the route was over capacity (telemetry)


class CapacityDispatch:
    """DeepSpeed's capacity dispatch: routes past an expert's capacity are dropped (weight 0).

    capacity_factor None = dropless (capacity = largest expert load over the expert-parallel group),
    as DeepSpeed's `drop_tokens=False`. Priority for slots: all first choices before second
    choices, earlier tokens first (GShard).
    """

    def __init__(self, num_experts: int, ep_size: int, capacity_factor, eval_capacity_factor, min_capacity: int):
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local = num_experts // ep_size
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity = min_capacity

    def _capacity(self, load_E: torch.Tensor, num_routes: int, training: bool, group) -> int:
        factor = self.capacity_factor if training or self.eval_capacity_factor is None else self.eval_capacity_factor
        if factor is None:
            cap = load_E.max().reshape(1)
        else:
            cap = load_E.new_tensor([max(math.ceil(num_routes / self.num_experts * factor), self.min_capacity)])
        # Every rank must use one capacity: the all-to-all moves [experts, capacity, D] blocks.
        if self.ep_size > 1:
            dist.all_reduce(cap, op=dist.ReduceOp.MAX, group=group)
        return max(int(cap.item()), 1)

    def dispatch(self, x_TD, route: RouterOutput, group, training: bool) -> tuple[torch.Tensor, CapacityPlan]:
        E = self.num_experts
        indices_KT = route.indices_TK.t()
        K, T = indices_KT.shape
        onehot_RE = torch.nn.functional.one_hot(indices_KT.reshape(-1), E)  # routes in priority order
        location_R = ((onehot_RE.cumsum(0) - 1) * onehot_RE).sum(1)
        capacity = self._capacity(onehot_RE.sum(0), K * T, training, group)
        kept_R = location_R < capacity
        idx_KT = torch.where(kept_R, indices_KT.reshape(-1), -1).view(K, T).to(torch.int32)
        loc_KT = (location_R * kept_R).view(K, T).to(torch.int32)
        gates_KT = route.weights_TK.t() * kept_R.view(K, T)
        slots_KT = _route_slots(idx_KT, loc_KT, E, capacity)
        x_ECD = _sparse_encode(x_TD, slots_KT, E, capacity)
        if self.ep_size > 1:
            x_ECD = _AllToAll.apply(group, x_ECD)  # now [source rank * local experts, C, D]
        # [ranks, local experts, C, D] -> [local experts, ranks * C, D]: one buffer per local expert.
        x_ECD = x_ECD.view(self.ep_size, self.num_local, capacity, -1).transpose(0, 1)
        x_ECD = x_ECD.reshape(self.num_local, self.ep_size * capacity, -1)
        dropped_KT = ~kept_R.view(K, T)
        return x_ECD, CapacityPlan(slots_KT, gates_KT, capacity, dropped_KT.sum(), dropped_KT)

    def combine(self, y_ECD: torch.Tensor, plan: CapacityPlan, route: RouterOutput, group) -> torch.Tensor:
        C = plan.capacity
        y_ECD = y_ECD.view(self.num_local, self.ep_size, C, -1).transpose(0, 1).reshape(self.num_experts, C, -1)
        if self.ep_size > 1:
            y_ECD = _AllToAll.apply(group, y_ECD)
        T = route.indices_TK.shape[0]
        return _sparse_decode(y_ECD.reshape(self.num_experts * C, -1), plan.slots_KT, plan.gates_KT, T)
