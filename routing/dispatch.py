"""Token dispatch and combine: how routed tokens reach their experts and come back.

Both dispatchers follow one protocol (`Dispatcher`): `dispatch` returns the rows each local
expert computes, grouped by expert, and a plan; the experts compute on those rows; `combine`
sends the results back and sums each token's k weighted expert outputs.

- `DroplessDispatch` (impl "grouped"): sort routes by expert, all-to-all with uneven splits,
  variable-size groups; every route is computed.
- `CapacityDispatch` (impl "deepspeed"): DeepSpeed's fixed-capacity buffers, filled by
  DeepSpeed's own sparse encode/decode from our routes; routes past capacity are dropped.

Shape suffixes: T tokens, K routes per token (top_k), D d_model, N routed rows (T*K, sorted by
expert), E experts (global), X local experts, P expert-parallel ranks, Q rows received from
the expert-parallel group, C capacity slots per expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from pathways_mm.routing.router import RouterOutput
from pathways_mm.runtime.compat import all_to_all_equal, route_slots, sparse_decode, sparse_encode


@dataclass(frozen=True)
class DispatchPlan:
    """What a dispatch did, for the expert compute, combine and telemetry."""

    counts_X: torch.Tensor  # [local experts] rows of the dispatched input per local expert, in order
    num_dropped: torch.Tensor  # scalar int64: routes over capacity (0 on the dropless path)
    dropped_TK: torch.Tensor | None  # [tokens, k] bool, True where a route was dropped; None: dropless


class Dispatcher(Protocol):
    def dispatch(
        self, x_TD: torch.Tensor, route: RouterOutput, group: Any, training: bool
    ) -> tuple[torch.Tensor, DispatchPlan]:
        """`x_TD` -> the rows this rank's experts compute ([rows, D], grouped by local expert)."""
        ...

    def combine(self, y_ND: torch.Tensor, plan: DispatchPlan, route: RouterOutput, group: Any) -> torch.Tensor:
        """Expert outputs (rows as dispatched) -> [tokens, D], each token's k outputs weighted and summed."""
        ...


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


@dataclass(frozen=True)
class DroplessPlan(DispatchPlan):
    order_N: torch.Tensor  # [tokens*k] routes sorted by global expert
    in_splits: list[int] | None  # rows sent to each rank (None: no exchange)
    out_splits: list[int] | None  # rows received from each rank
    regroup_Q: torch.Tensor | None  # received rows (ordered by source rank) -> grouped by local expert


class DroplessDispatch:
    """Every route is computed: variable-size expert groups, uneven all-to-all when ep_size > 1."""

    def __init__(self, num_experts: int, ep_size: int):
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local = num_experts // ep_size

    def dispatch(
        self, x_TD: torch.Tensor, route: RouterOutput, group, training: bool
    ) -> tuple[torch.Tensor, DroplessPlan]:
        k = route.indices_TK.shape[1]
        expert_N = route.indices_TK.reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)
        # index_select, not x_TD[...]: its backward is one index_add_, advanced indexing's an
        # accumulating index_put (a sort of the indices on CPU).
        x_ND = x_TD.index_select(0, order_N // k)
        # index_add_, not bincount: bincount on CUDA reads the max back to the host.
        counts_E = torch.zeros(self.num_experts, dtype=torch.long, device=x_TD.device)
        counts_E.index_add_(0, expert_N, torch.ones_like(expert_N))
        none_dropped = counts_E.new_zeros(())
        if self.ep_size == 1:
            return x_ND, DroplessPlan(counts_E, none_dropped, None, order_N, None, None, None)
        # Exchange counts first: every rank learns how many rows it gets for each local expert.
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=group)
        recv_counts_PX = recv_counts.view(self.ep_size, self.num_local)  # [source rank, local expert]
        splits = torch.stack([counts_E.view(self.ep_size, self.num_local).sum(1), recv_counts_PX.sum(1)]).tolist()
        in_splits, out_splits = splits
        x_QD = _AllToAllUneven.apply(x_ND, out_splits, in_splits, group)
        local_e = torch.arange(self.num_local, device=x_TD.device).repeat(self.ep_size)
        regroup_Q = torch.argsort(torch.repeat_interleave(local_e, recv_counts_PX.reshape(-1)), stable=True)
        plan = DroplessPlan(recv_counts_PX.sum(0), none_dropped, None, order_N, in_splits, out_splits, regroup_Q)
        return x_QD.index_select(0, regroup_Q), plan

    def combine(self, y_ND: torch.Tensor, plan: DroplessPlan, route: RouterOutput, group) -> torch.Tensor:
        if plan.regroup_Q is not None:
            y_ND = y_ND.index_select(0, _inverse(plan.regroup_Q))
            y_ND = _AllToAllUneven.apply(y_ND, plan.in_splits, plan.out_splits, group)
        T, k = route.indices_TK.shape
        # Weight each route's row, un-permute with a gather (the inverse of a permutation), sum
        # the k rows of a token. Not index_add_: its autograd saves the whole [N, D] source.
        # Weights are float32, so the sum over the k routes accumulates in float32.
        weights_N1 = route.weights_TK.reshape(-1).index_select(0, plan.order_N)[:, None]
        y_TKD = (y_ND * weights_N1).index_select(0, _inverse(plan.order_N)).view(T, k, -1)
        return y_TKD.sum(1).to(y_ND.dtype)


@dataclass(frozen=True)
class CapacityPlan(DispatchPlan):
    slots_KT: torch.Tensor  # [k, tokens] flat slot in the [experts * capacity] buffer (scratch if dropped)
    gates_KT: torch.Tensor  # [k, tokens] float32 combine weights, 0 for dropped routes
    capacity: int


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
        # Routes in priority order (all first choices, then all second choices, ...): a route's
        # place in its expert's queue is the number of earlier routes to that expert.
        onehot_NE = torch.nn.functional.one_hot(indices_KT.reshape(-1), E)
        location_N = ((onehot_NE.cumsum(0) - 1) * onehot_NE).sum(1)
        capacity = self._capacity(onehot_NE.sum(0), K * T, training, group)
        kept_N = location_N < capacity
        idx_KT = torch.where(kept_N, indices_KT.reshape(-1), -1).view(K, T).to(torch.int32)
        loc_KT = (location_N * kept_N).view(K, T).to(torch.int32)
        gates_KT = route.weights_TK.t() * kept_N.view(K, T)
        slots_KT = route_slots(idx_KT, loc_KT, E, capacity)
        x_ECD = sparse_encode(x_TD, slots_KT, E, capacity)
        if self.ep_size > 1:
            x_ECD = all_to_all_equal(group, x_ECD)  # now [source rank * local experts, C, D]
        # [ranks, local experts, C, D] -> [local experts, ranks * C, D]: one buffer per local expert,
        # flattened to rows grouped by local expert (equal counts).
        x_XCD = x_ECD.view(self.ep_size, self.num_local, capacity, -1).transpose(0, 1)
        rows = self.ep_size * capacity
        x_ND = x_XCD.reshape(self.num_local * rows, -1)
        counts_X = torch.full((self.num_local,), rows, dtype=torch.long, device=x_TD.device)
        dropped_TK = ~kept_N.view(K, T).t()
        return x_ND, CapacityPlan(counts_X, dropped_TK.sum(), dropped_TK, slots_KT, gates_KT, capacity)

    def combine(self, y_ND: torch.Tensor, plan: CapacityPlan, route: RouterOutput, group) -> torch.Tensor:
        C = plan.capacity
        y_ECD = y_ND.view(self.num_local, self.ep_size, C, -1).transpose(0, 1).reshape(self.num_experts, C, -1)
        if self.ep_size > 1:
            y_ECD = all_to_all_equal(group, y_ECD)
        T = route.indices_TK.shape[0]
        return sparse_decode(y_ECD.reshape(self.num_experts * C, -1), plan.slots_KT, plan.gates_KT, T)
