"""Task-conditioned top-k router: token logits plus a learned per-task pathway prior.

Shape suffixes: T tokens, D d_model, E experts, K routes per token (top_k), M tasks (max_tasks),
N routes (T*K).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pathways_mm.routing import objectives
from pathways_mm.routing.objectives import RouteBatch

BALANCES = ("per_task", "global")


class RouterOutput(NamedTuple):
    indices_TK: torch.Tensor  # [tokens, k] int64 expert ids, best first
    weights_TK: torch.Tensor  # [tokens, k] float32 combine weights, softmax over the chosen k
    probs_TE: torch.Tensor  # [tokens, experts] float32 softmax over allowed experts (telemetry)
    # Objective name -> unweighted scalar (routing.objectives): only those with a non-zero weight.
    losses: dict[str, torch.Tensor]


def fewest_covering(
    counts_ME: torch.Tensor, allowed_ME: torch.Tensor, mass: float, min_experts: int, max_experts: int
) -> torch.Tensor:
    """Per task, the fewest allowed experts (most routes first) that carry `mass` of its routes.

    At least `min_experts` and at most `max_experts` per task; a task without counted routes
    keeps its row of `allowed_ME`. Sort and cumsum on the device: no host sync.
    """
    E = counts_ME.shape[1]
    # Disallowed experts sort last and are never picked, so the result stays inside `allowed_ME`.
    key_ME = torch.where(allowed_ME, counts_ME.double(), torch.full_like(counts_ME, -1, dtype=torch.float64))
    total_M = counts_ME.double().sum(-1)
    sorted_ME, order_ME = key_ME.sort(stable=True, dim=-1, descending=True)
    before_ME = (sorted_ME.clamp(min=0).cumsum(-1) - sorted_ME.clamp(min=0)) / total_M.clamp(min=1.0)[:, None]
    rank_E = torch.arange(E, device=counts_ME.device)
    keep_ME = ((before_ME < mass - 1e-9) | (rank_E < min_experts)) & (rank_E < max_experts) & (sorted_ME >= 0)
    chosen_ME = torch.zeros_like(allowed_ME).scatter(1, order_ME, keep_ME)
    return torch.where((total_M > 0)[:, None], chosen_ME, allowed_ME)


@torch.no_grad()
def load_capped_covering(
    counts_ME: torch.Tensor,
    allowed_ME: torch.Tensor,
    mass: float,
    min_experts: int,
    max_experts: int,
    cap: float,
) -> torch.Tensor:
    """`fewest_covering` with the load in view: no expert takes more than `cap` x its fair share
    of all counted routes (sum / experts), so the masks do not pile every task onto the same few.

    Tasks choose in turn, the largest first, each going down its own preference list: an expert
    whose load (the routes the tasks that kept it sent it in `counts_ME`) would pass the cap is
    skipped, until the task's kept experts carry `mass` of its routes or it holds `max_experts`.
    A task short of `min_experts` then takes its most preferred skipped experts. One host sync:
    it runs once per training run.
    """
    counts, allowed = counts_ME.double().cpu(), allowed_ME.cpu()
    M, E = counts.shape
    limit = cap * counts.sum().item() / E
    load = torch.zeros(E, dtype=torch.float64)
    chosen = allowed.clone()
    total_M = counts.sum(1)
    for t in sorted(range(M), key=lambda t: -total_M[t].item()):
        if total_M[t] <= 0:
            continue  # no routes counted: the task keeps its row
        prefs = [e for e in counts[t].argsort(descending=True, stable=True).tolist() if allowed[t, e]]
        keep, skipped, covered = [], [], 0.0
        for e in prefs:
            if covered >= mass * total_M[t].item() - 1e-9 and len(keep) >= min_experts or len(keep) == max_experts:
                break
            if load[e] + counts[t, e] > limit and load[e] > 0:
                skipped.append(e)
                continue
            keep.append(e)
            covered += counts[t, e].item()
        keep += skipped[: max(0, min_experts - len(keep))]
        for e in keep:
            load[e] += counts[t, e]
        chosen[t] = False
        chosen[t, keep] = True
    return chosen.to(allowed_ME.device)


class TaskRouter(nn.Module):
    """logits = x·W_r + P[task], masked to the task's allowed experts; top-k, softmax over the k.

    balance: "per_task" (Switch loss per task, averaged) or "global" (over all tokens).
    task_prior: False leaves the pathway prior out of the logits (plain token routing).
    debug_route_to: send every route of every token to this expert (weights 1/k), a test switch
    for ranks that receive no tokens. jitter: multiplicative input noise in training (Switch).
    mask_mass > 0 makes pathways hard late in training: the router tallies each task's routes over
    the `mask_window` training forwards that end with forward `mask_step`, then restricts every
    task to the fewest experts carrying `mask_mass` of them (at least top_k, at most
    `mask_max_experts`; see `restrict_to_routes`). A task then reaches only those experts, so its
    exported sub-network holds only them. mask_load_cap > 0 chooses them with the load in view
    (`load_capped_covering`): no expert gets more than that many times its fair share.
    weights: objective name -> weight (routing.objectives); objectives at weight 0 are not computed.
    None computes every objective (a bare router, as in tests).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        max_tasks: int,
        top_k: int,
        *,
        balance: str = "per_task",
        task_prior: bool = True,
        jitter: float = 0.0,
        debug_route_to: int | None = None,
        groups: tuple[int, ...] = (),
        mask_mass: float = 0.0,
        mask_step: int = 0,
        mask_window: int = 100,
        mask_max_experts: int | None = None,
        mask_load_cap: float = 0.0,
        weights: dict[str, float] | None = None,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and num_experts ({num_experts}); lower moe.top_k")
        if debug_route_to is not None and not 0 <= debug_route_to < num_experts:
            raise ValueError(f"debug_route_to ({debug_route_to}) must name an expert in [0, {num_experts})")
        if balance not in BALANCES:
            raise ValueError(f"balance {balance!r} is not one of {BALANCES}; change moe.balance")
        self.num_experts, self.max_tasks, self.top_k = num_experts, max_tasks, top_k
        if groups and sum(groups) != num_experts:
            raise ValueError(f"expert groups {groups} must sum to num_experts ({num_experts})")
        self.balance = balance
        # False: plain token routing (the ablation's baseline); the prior stays in the state dict
        # but is multiplied by 0, so it gets zero gradients and loads like any other.
        self.prior_scale = 1.0 if task_prior else 0.0
        self.jitter, self.debug_route_to = jitter, debug_route_to
        self.weights = weights
        self.groups = tuple(groups)  # blocks of experts scored by separate matmuls (see `token_logits`)
        self.wg = nn.Linear(d_model, num_experts, bias=False)
        # Pathway priors start at zero so every task begins from the shared token router.
        self.pathway = nn.Parameter(torch.zeros(max_tasks, num_experts))
        # Named without "expert": DeepSpeed moves every MoE state key containing it to expert files.
        self.register_buffer("allowed", torch.ones(max_tasks, num_experts, dtype=torch.bool))
        # Set by routing.pathways.restrict_experts on an exported sub-network: the ids of the
        # experts the layer still holds; the router scores all experts, then keeps these.
        self.register_buffer("kept", None)
        self.mask_mass, self.mask_step, self.mask_window = mask_mass, mask_step, mask_window
        self.mask_load_cap = mask_load_cap
        self.mask_max_experts = num_experts // 2 if mask_max_experts is None else mask_max_experts
        if mask_mass > 0:
            if not (
                0 < mask_mass <= 1 and 1 <= mask_window <= mask_step and top_k <= self.mask_max_experts <= num_experts
            ):
                raise ValueError(
                    f"route masks need 0 < mask_mass <= 1, 1 <= mask_window ({mask_window}) <= mask_step ({mask_step}) "
                    f"and top_k ({top_k}) <= mask_max_experts ({self.mask_max_experts}) <= num_experts ({num_experts})"
                )
            # Only with masks on, so other checkpoints keep their keys. Persistent: a resumed run
            # restricts at the same forward from the same tally. int64: exact, untouched by bf16 casts.
            self.register_buffer("route_tally", torch.zeros(max_tasks, num_experts, dtype=torch.long))
            self.register_buffer("num_forwards", torch.zeros((), dtype=torch.long))
        self._forwards: int | None = None  # host copy of num_forwards, read once (the only sync)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._forwards = None  # re-read num_forwards from the loaded state on the next training forward

    def set_allowed(self, task: int, experts: list[int] | torch.Tensor) -> None:
        """Restrict `task` to the given expert ids (at least top_k of them)."""
        row = torch.zeros(self.num_experts, dtype=torch.bool, device=self.allowed.device)
        row[torch.as_tensor(experts, dtype=torch.long, device=row.device)] = True
        if int(row.sum()) < self.top_k:
            raise ValueError(f"task {task}: allow at least top_k={self.top_k} experts, got {int(row.sum())}")
        self.allowed[task] = row

    def restrict_to_routes(self, counts_ME: torch.Tensor) -> None:
        """Allow each task only the fewest experts carrying `mask_mass` of its routes in `counts_ME`
        ([max_tasks, experts]); tasks without routes keep their mask."""
        args = (counts_ME, self.allowed, self.mask_mass, self.top_k, self.mask_max_experts)
        if self.mask_load_cap > 0:
            self.allowed.copy_(load_capped_covering(*args, self.mask_load_cap))
        else:
            self.allowed.copy_(fewest_covering(*args))

    def logits(self, x_TD: torch.Tensor, task_T: torch.Tensor) -> torch.Tensor:
        """Masked float32 router logits [tokens, experts]."""
        # Router math in float32: bf16 logits flip top-k ties and lose the small prior differences.
        x_TD = x_TD.float()
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits_TE = self.token_logits(x_TD) + self.prior_scale * self.pathway.float()[task_T]
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

    def forward(self, x_TD: torch.Tensor, task_T: torch.Tensor, valid_T: torch.Tensor | None = None) -> RouterOutput:
        """valid_T: 0/1 per token, 0 at padding: the global balance, the MI loss and the route
        tally leave padding out (None: every token counts). The per-task balance counts every
        token, as it always did."""
        logits_TE = self.logits(x_TD, task_T)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.debug_route_to is None:
            top_logits_TK, indices_TK = logits_TE.topk(self.top_k, dim=-1)
            weights_TK = top_logits_TK.softmax(dim=-1)
        else:
            T = x_TD.shape[0]
            indices_TK = torch.full((T, self.top_k), self.debug_route_to, dtype=torch.long, device=x_TD.device)
            weights_TK = probs_TE.new_full((T, self.top_k), 1.0 / self.top_k)
        batch = RouteBatch(logits_TE, probs_TE, indices_TK, task_T, valid_T, self.max_tasks, self.balance)
        losses = objectives.compute(batch, self.weights)
        if self.training and self.mask_mass > 0 and self.kept is None:
            self._tally(indices_TK, task_T, valid_T)
        return RouterOutput(indices_TK, weights_TK, probs_TE, losses)

    @torch.no_grad()
    def _tally(self, indices_TK: torch.Tensor, task_T: torch.Tensor, valid_T: torch.Tensor | None) -> None:
        """Count this training forward's routes if it is in the mask window; restrict after the last one."""
        if self._forwards is None:
            self._forwards = int(self.num_forwards)
        self._forwards += 1
        self.num_forwards.fill_(self._forwards)
        if not self.mask_step - self.mask_window < self._forwards <= self.mask_step:
            return
        w_N = torch.ones_like(indices_TK) if valid_T is None else valid_T.long()[:, None].expand_as(indices_TK)
        flat_N = (task_T[:, None] * self.num_experts + indices_TK).reshape(-1)
        self.route_tally.view(-1).index_add_(0, flat_N, w_N.reshape(-1))
        if self._forwards == self.mask_step:
            tally_ME = self.route_tally.clone()
            # Every data-parallel replica must pick the same experts: restrict on the summed tally.
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(tally_ME)
            self.restrict_to_routes(tally_ME)
