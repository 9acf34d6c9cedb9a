"""PathwaysMoE: a DeepSpeed-MoE layer whose tokens follow learned per-task pathways.

The forward reads as four steps: route (TaskRouter) -> dispatch (a `Dispatcher`) -> compute
(the local experts) -> combine.

Shape suffixes: B batch, L positions, D d_model, T tokens (B*L).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from pathways_mm.config import ModelConfig
from pathways_mm.routing import objectives, telemetry
from pathways_mm.routing.dispatch import CapacityDispatch, Dispatcher, DispatchPlan, DroplessDispatch
from pathways_mm.routing.experts import GroupedExperts, SharedExpert
from pathways_mm.routing.router import RouterOutput, TaskRouter

IMPLS = ("grouped", "deepspeed")
# MoEConfig keys that are keyword arguments of the same name: of PathwaysMoE, of its TaskRouter.
LAYER_KEYS = (
    "ep_size",
    "impl",
    "capacity_factor",
    "eval_capacity_factor",
    "balance_coef",
    "mi_coef",
    "z_loss_coef",
    "shared_d_ff",
)
ROUTER_KEYS = (
    "balance",
    "task_prior",
    "debug_route_to",
    "mask_mass",
    "mask_step",
    "mask_window",
    "mask_max_experts",
    "mask_load_cap",
)


class MoEOutput(NamedTuple):
    out: torch.Tensor  # [B, L, D]
    aux_loss: torch.Tensor  # sum of weight * objective (routing.objectives); 0 when every weight is 0
    route: RouterOutput
    num_dropped: torch.Tensor  # scalar, routes over capacity (always 0 on the dropless path)
    # Detached scalars for the training log: each computed objective (unweighted), "dropped" (routes
    # over capacity) and, with a shared expert, "routed_share" (see `routed_share`).
    stats: dict[str, torch.Tensor]


def routed_share(routed_TD: torch.Tensor, shared_TD: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens of ||routed|| / (||routed|| + ||shared||): near 0 when the shared expert
    carries the layer and the routed experts have stopped mattering."""
    r_T, s_T = routed_TD.float().norm(dim=-1), shared_TD.float().norm(dim=-1)
    share_T = r_T / (r_T + s_T).clamp(min=1e-12)
    if valid_T is None:
        return share_T.mean()
    w_T = valid_T.float()
    return (share_T * w_T).sum() / w_T.sum().clamp(min=1.0)


class _MoEParts(nn.Module):
    """Router + local experts under DeepSpeed's attribute names (`deepspeed_moe.gate/experts`)."""

    def __init__(self, gate: TaskRouter, experts: GroupedExperts):
        super().__init__()
        self.gate, self.experts = gate, experts
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        """Called by DeepSpeed's MoE.set_deepspeed_parallelism once the engine made the groups."""
        self.ep_group = ep_group


class PathwaysMoE(MoE):
    """Sparse SwiGLU FFN: route (TaskRouter) -> dispatch -> compute (local experts) -> combine.

    impl "grouped": dropless, sorted tokens, uneven all-to-all, grouped GEMM.
    impl "deepspeed": DeepSpeed's capacity buffers and all-to-all; capacity_factor None = dropless.
    Expert parameters carry DeepSpeed's allreduce=False/group_name tags; the state dict uses
    DeepSpeed's per-expert keys, so checkpoints move between impls and ep_size.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        max_tasks: int,
        top_k: int = 2,
        *,
        ep_size: int = 1,
        impl: str = "grouped",
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        balance_coef: float = 0.01,
        mi_coef: float = 0.0,
        z_loss_coef: float = 0.001,
        shared_d_ff: int = 0,
        use_grouped_mm: bool | None = None,
        **router: Any,
    ):
        """shared_d_ff > 0: a dense SwiGLU of that width beside the routed experts, which every token
        passes through (trunk, like attention: never masked or cut by an export).
        router: the TaskRouter's keyword arguments (balance, task_prior, jitter, debug_route_to,
        groups, mask_mass, mask_step, mask_window, mask_max_experts, mask_load_cap)."""
        # MoE.__init__ is skipped on purpose: it builds DeepSpeed's TopKGate and deep-copied Experts,
        # which this layer replaces. The attributes DeepSpeed's engine reads are set here instead.
        nn.Module.__init__(self)
        if num_experts < 1 or ep_size < 1 or num_experts % ep_size:
            raise ValueError(
                f"num_experts ({num_experts}) must be a positive multiple of ep_size ({ep_size}); "
                "change moe.num_experts or moe.ep_size"
            )
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and num_experts ({num_experts}); change moe.top_k")
        if impl not in IMPLS:
            raise ValueError(f"impl {impl!r} is not one of {IMPLS}; change moe.impl")
        self.impl, self.ep_size, self.num_experts, self.top_k = impl, ep_size, num_experts, top_k
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.use_residual, self.enable_expert_tensor_parallelism = False, False
        self.weights = {"balance": balance_coef, "mi": mi_coef, "z": z_loss_coef}
        assert set(self.weights) == set(objectives.OBJECTIVES), "a routing objective without its weight"
        gate = TaskRouter(d_model, num_experts, max_tasks, top_k, weights=self.weights, **router)
        experts = GroupedExperts(self.num_local_experts, d_model, d_ff, self.expert_group_name, use_grouped_mm)
        self.deepspeed_moe = _MoEParts(gate, experts)
        # Named without "expert": DeepSpeed moves every MoE state key containing it to expert files,
        # and this FFN is an ordinary data-parallel parameter on every rank.
        self.shared = SharedExpert(d_model, shared_d_ff) if shared_d_ff > 0 else None
        self.dispatcher: Dispatcher = (
            DroplessDispatch(num_experts, ep_size)
            if impl == "grouped"
            else CapacityDispatch(num_experts, ep_size, capacity_factor, eval_capacity_factor, min_capacity)
        )
        telemetry.register(self)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> PathwaysMoE:
        m = cfg.moe
        layer = {k: getattr(m, k) for k in LAYER_KEYS}
        router = {k: getattr(m, k) for k in ROUTER_KEYS}
        router.update(jitter=m.router_jitter, groups=tuple(m.expert_groups.values()))
        return cls(cfg.d_model, m.expert_d_ff or cfg.d_ff, m.num_experts, cfg.max_tasks, m.top_k, **layer, **router)

    @property
    def router(self) -> TaskRouter:
        return self.deepspeed_moe.gate

    @property
    def experts(self) -> GroupedExperts:
        return self.deepspeed_moe.experts

    def expert_params(self) -> list[nn.Parameter]:
        """This rank's expert weights (num_local_experts of the num_experts)."""
        return list(self.experts.parameters())

    def _group(self):
        """The expert-parallel group; made here when the layer runs outside DeepSpeed's engine."""
        if self.ep_size == 1:
            return None
        if self.deepspeed_moe.ep_group is None:
            if not dist.is_initialized():
                raise RuntimeError(
                    f"ep_size={self.ep_size} needs {self.ep_size} processes: launch with `deepspeed` and "
                    "wrap the model with deepspeed.initialize, or set moe.ep_size: 1"
                )
            deepspeed.init_distributed()  # adopts the existing process group
            self.set_deepspeed_parallelism()
        return self.deepspeed_moe.ep_group

    def route(self, x_TD: torch.Tensor, task_T: torch.Tensor, valid_T: torch.Tensor | None = None) -> RouterOutput:
        return self.router(x_TD, task_T, valid_T)

    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput) -> tuple[torch.Tensor, DispatchPlan]:
        return self.dispatcher.dispatch(x_TD, route, self._group(), self.training)

    def compute(self, x_local: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return self.experts(x_local, plan.counts_X)

    def combine(self, y_local: torch.Tensor, plan: DispatchPlan, route: RouterOutput) -> torch.Tensor:
        return self.dispatcher.combine(y_local, plan, route, self._group())

    def aux(self, route: RouterOutput, plan: DispatchPlan) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the computed objectives, and the layer's numbers for the log."""
        stats = {name: v.detach() for name, v in route.losses.items()}
        stats["dropped"] = plan.num_dropped.detach().float()
        total = objectives.weighted_sum(route.losses, self.weights)
        return (route.probs_TE.new_zeros(()) if total is None else total), stats

    def forward(  # type: ignore[override]
        self, x_BLD: torch.Tensor, task_ids_BL: torch.Tensor, modality_ids_BL: torch.Tensor | None = None
    ) -> MoEOutput:
        """modality_ids_BL: index into MODALITIES per position, -1 at padding (route telemetry, the
        global balance and the MI loss leave padding out; None = every position is text)."""
        x_TD = x_BLD.reshape(-1, x_BLD.shape[-1])
        task_T = task_ids_BL.reshape(-1)
        modality_T = None if modality_ids_BL is None else modality_ids_BL.reshape(-1)
        valid_T = None if modality_T is None else modality_T >= 0
        route = self.route(x_TD, task_T, valid_T)
        x_local, plan = self.dispatch(x_TD, route)
        telemetry.record(self, route.indices_TK, route.probs_TE, task_T, modality_T, plan.dropped_TK)
        y_local = self.compute(x_local, plan)
        out_TD = self.combine(y_local, plan, route)
        aux, stats = self.aux(route, plan)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            stats["routed_share"] = routed_share(out_TD.detach(), shared_TD.detach(), valid_T)
            out_TD = out_TD + shared_TD
        return MoEOutput(out_TD.view_as(x_BLD), aux, route, plan.num_dropped, stats)


def moe_layers(model: nn.Module) -> list[tuple[str, PathwaysMoE]]:
    """(name, layer) of every PathwaysMoE, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PathwaysMoE)]
