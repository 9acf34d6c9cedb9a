"""Task-conditioned routing and the PathwaysMoE layer on DeepSpeed-MoE."""

from pathways_mm.routing.moe import MoEOutput, PathwaysMoE, moe_layers
from pathways_mm.routing.router import RouterOutput, TaskRouter

__all__ = ["MoEOutput", "PathwaysMoE", "RouterOutput", "TaskRouter", "moe_layers"]
