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


def active_params(model: Decoder) -> int:
    """Parameters a token touches: everything except the experts it is not routed to."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        num_experts = getattr(m, "num_experts", None)
        top_k = getattr(getattr(m, "moe_cfg", None), "top_k", None)
        if num_experts and top_k and hasattr(m, "expert_params"):
            expert_total = sum(p.numel() for p in m.expert_params())
            total -= expert_total - expert_total * top_k // num_experts
    return total
