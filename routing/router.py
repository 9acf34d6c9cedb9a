"""Task-conditioned top-k router: token logits plus a learned per-task pathway prior.

Shape suffixes: T tokens, D d_model, E experts, K routes per token (top_k), M tasks (max_tasks).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class RouterOutput(NamedTuple):
    indices_TK: torch.Tensor  # [tokens, k] int64 expert ids, best first
    weights_TK: torch.Tensor  # [tokens, k] float32 combine weights, softmax over the chosen k
    probs_TE: torch.Tensor  # [tokens, experts] float32 softmax over allowed experts (telemetry)
    balance_loss: torch.Tensor  # scalar, per-task Switch loss averaged over tasks present
    z_loss: torch.Tensor  # scalar, mean logsumexp(logits)^2


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def per_task_balance_loss(
    probs_TE: torch.Tensor, indices_TK: torch.Tensor, task_T: torch.Tensor, num_tasks: int
) -> torch.Tensor:
    """Switch load-balance loss E * sum_e f_e * P_e computed per task, averaged over tasks present.

    f_e is the fraction of a task's routes (tokens x k) sent to expert e, P_e the task's mean
    router probability for e. Averaging per task keeps a big task from hiding a small one's
    collapse. Uses scatter-adds, not boolean indexing, so nothing syncs with the host.
    """
    T, E = probs_TE.shape
    k = indices_TK.shape[1]
    ones_T = probs_TE.new_ones(T)
    tokens_M = probs_TE.new_zeros(num_tasks).index_add_(0, task_T, ones_T)
    routes_ME = probs_TE.new_zeros(num_tasks * E)
    flat_ME = (task_T[:, None] * E + indices_TK).reshape(-1)
    routes_ME = routes_ME.index_add_(0, flat_ME, probs_TE.new_ones(T * k)).view(num_tasks, E)
    prob_sum_ME = probs_TE.new_zeros(num_tasks, E).index_add(0, task_T, probs_TE)
    denom_M = tokens_M.clamp(min=1.0)
    f_ME = routes_ME / (denom_M[:, None] * k)
    p_ME = prob_sum_ME / denom_M[:, None]
    loss_M = E * (f_ME * p_ME).sum(-1)
    present_M = (tokens_M > 0).to(probs_TE.dtype)
    return (loss_M * present_M).sum() / present_M.sum().clamp(min=1.0)


def global_balance_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
    """Switch load-balance loss over all tokens regardless of task (the per-task loss with one task)."""
    task_T = torch.zeros(probs_TE.shape[0], dtype=torch.long, device=probs_TE.device)
    return per_task_balance_loss(probs_TE, indices_TK, task_T, 1)


class TaskRouter(nn.Module):
    """logits = x·W_r + P[task], masked to the task's allowed experts; top-k, softmax over the k.

    debug_route_to: send every route of every token to this expert (weights 1/k), a test switch
    for ranks that receive no tokens. jitter: multiplicative input noise in training (Switch).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        max_tasks: int,
        top_k: int,
        *,
        jitter: float = 0.0,
        debug_route_to: int | None = None,
        groups: tuple[int, ...] = (),
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and num_experts ({num_experts}); lower moe.top_k")
        if debug_route_to is not None and not 0 <= debug_route_to < num_experts:
            raise ValueError(f"debug_route_to ({debug_route_to}) must name an expert in [0, {num_experts})")
        self.num_experts, self.max_tasks, self.top_k = num_experts, max_tasks, top_k
        if groups and sum(groups) != num_experts:
            raise ValueError(f"expert groups {groups} must sum to num_experts ({num_experts})")
        self.jitter, self.debug_route_to = jitter, debug_route_to
        self.groups = tuple(groups)  # blocks of experts scored by separate matmuls (see `token_logits`)
        self.wg = nn.Linear(d_model, num_experts, bias=False)
        # Pathway priors start at zero so every task begins from the shared token router.
        self.pathway = nn.Parameter(torch.zeros(max_tasks, num_experts))
        # Named without "expert": DeepSpeed moves every MoE state key containing it to expert files.
        self.register_buffer("allowed", torch.ones(max_tasks, num_experts, dtype=torch.bool))
        # Set by routing.pathways.restrict_experts on an exported sub-network: the ids of the
        # experts the layer still holds; the router scores all experts, then keeps these.
        self.register_buffer("kept", None)

    def set_allowed(self, task: int, experts: list[int] | torch.Tensor) -> None:
        """Restrict `task` to the given expert ids (at least top_k of them)."""
        row = torch.zeros(self.num_experts, dtype=torch.bool, device=self.allowed.device)
        row[torch.as_tensor(experts, dtype=torch.long, device=row.device)] = True
        if int(row.sum()) < self.top_k:
            raise ValueError(f"task {task}: allow at least top_k={self.top_k} experts, got {int(row.sum())}")
        self.allowed[task] = row

    def logits(self, x_TD: torch.Tensor, task_T: torch.Tensor) -> torch.Tensor:
        """Masked float32 router logits [tokens, experts]."""
        # Router math in float32: bf16 logits flip top-k ties and lose the small prior differences.
        x_TD = x_TD.float()
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits_TE = self.token_logits(x_TD) + self.pathway.float()[task_T]
        logits_TE = logits_TE.masked_fill(~self.allowed[task_T], float("-inf"))
        return logits_TE if self.kept is None else logits_TE[:, self.kept]

    def token_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """x·W_r, one matmul per block of experts.

        A matmul's result can change in the last bits with its output width (the kernel blocks
        the work differently), so experts added later are scored apart: the old experts' logits,
        and with them the old tasks' routes, stay bit-identical when a layer grows.
        """
        w = self.wg.weight.float()
        if len(self.groups) <= 1:
            return F.linear(x_TD, w)
        return torch.cat([F.linear(x_TD, w_g) for w_g in w.split(self.groups)], dim=-1)

    def forward(self, x_TD: torch.Tensor, task_T: torch.Tensor) -> RouterOutput:
        logits_TE = self.logits(x_TD, task_T)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.debug_route_to is None:
            top_logits_TK, indices_TK = logits_TE.topk(self.top_k, dim=-1)
            weights_TK = top_logits_TK.softmax(dim=-1)
        else:
            T = x_TD.shape[0]
            indices_TK = torch.full((T, self.top_k), self.debug_route_to, dtype=torch.long, device=x_TD.device)
            weights_TK = probs_TE.new_full((T, self.top_k), 1.0 / self.top_k)
        balance = per_task_balance_loss(probs_TE, indices_TK, task_T, self.max_tasks)
        return RouterOutput(indices_TK, weights_TK, probs_TE, balance, z_loss(logits_TE))
