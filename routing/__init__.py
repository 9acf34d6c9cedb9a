"""Task-conditioned routing and the PathwaysMoE layer on DeepSpeed-MoE."""

from pathways_mm.routing.moe import MoEOutput, PathwaysMoE, build_moe_ffn
from pathways_mm.routing.router import RouterOutput, TaskRouter

__all__ = ["MoEOutput", "PathwaysMoE", "RouterOutput", "TaskRouter", "build_moe_ffn"]
