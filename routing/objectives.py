"""Routing objectives: the router's aux losses by name, each with the MoEConfig key of its weight.

    @register_objective("z", weight_key="z_loss_coef")
    def z(r: RouteBatch) -> torch.Tensor: ...

A layer computes only the objectives whose weight is not 0 and adds them in registration order
(balance, z, mi: the order the total was always summed in, so the loss stays bit-identical).

Shape suffixes: T tokens, E experts, K routes per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def per_task_balance_loss(
    probs_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    task_T: torch.Tensor,
    num_tasks: int,
    valid_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch load-balance loss E * sum_e f_e * P_e computed per task, averaged over tasks present.

    f_e is the fraction of a task's routes (tokens x k) sent to expert e, P_e the task's mean
    router probability for e. Averaging per task keeps a big task from hiding a small one's
    collapse, but it also spreads every task over every expert: no task can own a pathway.
    valid_T: 0/1 per token (padding 0); None counts every token. Uses scatter-adds, not boolean
    indexing, so nothing syncs with the host.
    """
    T, E = probs_TE.shape
    k = indices_TK.shape[1]
    w_T = probs_TE.new_ones(T) if valid_T is None else valid_T.to(probs_TE.dtype)
    tokens_M = probs_TE.new_zeros(num_tasks).index_add_(0, task_T, w_T)
    routes_ME = probs_TE.new_zeros(num_tasks * E)
    flat_ME = (task_T[:, None] * E + indices_TK).reshape(-1)
    routes_ME = routes_ME.index_add_(0, flat_ME, w_T.repeat_interleave(k)).view(num_tasks, E)
    prob_sum_ME = probs_TE.new_zeros(num_tasks, E).index_add(0, task_T, probs_TE * w_T[:, None])
    denom_M = tokens_M.clamp(min=1.0)
    f_ME = routes_ME / (denom_M[:, None] * k)
    p_ME = prob_sum_ME / denom_M[:, None]
    loss_M = E * (f_ME * p_ME).sum(-1)
    present_M = (tokens_M > 0).to(probs_TE.dtype)
    return (loss_M * present_M).sum() / present_M.sum().clamp(min=1.0)


def global_balance_loss(
    probs_TE: torch.Tensor, indices_TK: torch.Tensor, valid_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch load-balance loss over all tokens regardless of task (the per-task loss with one task)."""
    task_T = torch.zeros(probs_TE.shape[0], dtype=torch.long, device=probs_TE.device)
    return per_task_balance_loss(probs_TE, indices_TK, task_T, 1, valid_T)


def _entropy(p_XE: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row; the clamp keeps the gradient finite at p = 0 (masked experts, absent tasks)."""
    return -(p_XE * p_XE.clamp(min=1e-12).log()).sum(-1)


def mutual_information_loss(
    probs_TE: torch.Tensor, task_T: torch.Tensor, num_tasks: int, valid_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Mod-Squad's MI loss, -(H(E) - sum_t p(t) H(E | t)), from this batch's router probabilities (nats).

    p(e | t) is the mean router probability over task t's tokens, p(t) the task's share of the
    tokens and p(e) = sum_t p(t) p(e | t). Minimising it balances experts over all tokens (high
    H(E)) while each task concentrates on few of them (low H(E | t)): task-specific pathways over
    a balanced pool. Lies in [-min(H(T), ln E), 0].
    """
    T, E = probs_TE.shape
    w_T = probs_TE.new_ones(T) if valid_T is None else valid_T.to(probs_TE.dtype)
    tokens_M = probs_TE.new_zeros(num_tasks).index_add(0, task_T, w_T)
    prob_sum_ME = probs_TE.new_zeros(num_tasks, E).index_add(0, task_T, probs_TE * w_T[:, None])
    p_M = tokens_M / tokens_M.sum().clamp(min=1.0)
    p_e_given_t_ME = prob_sum_ME / tokens_M.clamp(min=1.0)[:, None]
    p_E = (p_M[:, None] * p_e_given_t_ME).sum(0)
    return (p_M * _entropy(p_e_given_t_ME)).sum() - _entropy(p_E)


class RouteBatch(NamedTuple):
    """What an objective may read of one router forward."""

    logits_TE: torch.Tensor  # float32, masked (-inf at experts a task may not use)
    probs_TE: torch.Tensor
    indices_TK: torch.Tensor
    task_T: torch.Tensor
    valid_T: torch.Tensor | None  # 0 at padding; None: every token counts
    num_tasks: int
    balance: str  # "per_task" or "global"


class Objective(NamedTuple):
    weight_key: str  # the MoEConfig field holding its weight
    fn: Callable[[RouteBatch], torch.Tensor]


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, weight_key: str):
    """Decorator: add a routing objective; a name registered twice is an error."""

    def add(fn: Callable[[RouteBatch], torch.Tensor]) -> Callable[[RouteBatch], torch.Tensor]:
        if name in OBJECTIVES:
            raise ValueError(f"routing objective {name!r} is registered twice")
        OBJECTIVES[name] = Objective(weight_key, fn)
        return fn

    return add


@register_objective("balance", weight_key="balance_coef")
def balance(r: RouteBatch) -> torch.Tensor:
    """Switch load balance, per task (every token counts) or over all tokens (padding left out)."""
    if r.balance == "per_task":
        return per_task_balance_loss(r.probs_TE, r.indices_TK, r.task_T, r.num_tasks)
    return global_balance_loss(r.probs_TE, r.indices_TK, r.valid_T)


@register_objective("z", weight_key="z_loss_coef")
def router_z(r: RouteBatch) -> torch.Tensor:
    return z_loss(r.logits_TE)


@register_objective("mi", weight_key="mi_coef")
def mutual_information(r: RouteBatch) -> torch.Tensor:
    return mutual_information_loss(r.probs_TE, r.task_T, r.num_tasks, r.valid_T)


def compute(r: RouteBatch, weights: dict[str, float] | None) -> dict[str, torch.Tensor]:
    """Each objective whose weight is not 0 (None: every objective), unweighted, in registration order."""
    return {name: obj.fn(r) for name, obj in OBJECTIVES.items() if weights is None or weights.get(name, 0.0)}


def weighted_sum(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor | None:
    """sum of weight * loss in the dict's order (None when there is none)."""
    total = None
    for name, value in losses.items():
        term = weights[name] * value
        total = term if total is None else total + term
    return total
