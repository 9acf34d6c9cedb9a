"""Model assembly: `build_model(cfg, vocab_size)` returns a plain `nn.Module` (no DeepSpeed here)."""

from __future__ import annotations

from pathways_mm.config import ModelConfig
from pathways_mm.decoder import Decoder, dense_ffn


def build_model(cfg: ModelConfig, vocab_size: int) -> Decoder:
    """The decoder; every `moe.moe_every`-th FFN is a PathwaysMoE when `moe.num_experts > 0`."""
    if cfg.moe.num_experts:
        from pathways_mm.routing import build_moe_ffn

        return Decoder(cfg, vocab_size, ffn_factory=build_moe_ffn)
    return Decoder(cfg, vocab_size, ffn_factory=dense_ffn)


def param_counts(model: Decoder) -> tuple[int, int]:
    """(total, active) parameters over all ranks: a token touches top_k of each layer's experts."""
    total = active = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if hasattr(m, "expert_params") and hasattr(m, "num_local_experts"):
            per_expert = sum(p.numel() for p in m.expert_params()) // m.num_local_experts
            total += per_expert * (m.num_experts - m.num_local_experts)  # experts held by other ranks
            active -= per_expert * (m.num_local_experts - m.top_k)
    return total, active
