"""Decoder building blocks: SwiGLU, RoPE, multi-query/grouped-query attention, the parallel block.

Every block computes `y = x + attn(norm(x)) + ffn(norm(x))` (PaLM). The FFN is a swappable
part: any module whose forward takes `(x_BLD, task_ids_BL, modality_ids_BL)` and returns an
object with `.out` ([B, L, D]), `.aux_loss` (a scalar added to the training loss, or None) and
`.stats` (detached scalars by name for the training log), such as `SwiGLU` here or
`routing.PathwaysMoE`.

Shape suffixes: B batch, L positions, D d_model, H heads, d head dimension, F FFN hidden.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pathways_mm.config import ModelConfig
from pathways_mm.model.adapters import TaskFFN, task_lora


class FFNOutput(NamedTuple):
    out: torch.Tensor  # [B, L, D]
    aux_loss: torch.Tensor | None  # scalar added to the training loss (MoE balance, z-loss)
    stats: dict[str, torch.Tensor] = {}  # detached scalars for the training log (an MoE layer's objectives)


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(
        self, x: torch.Tensor, task_ids: torch.Tensor | None = None, modality_ids: torch.Tensor | None = None
    ) -> FFNOutput:
        return FFNOutput(self.w2(F.silu(self.w1(x)) * self.w3(x)), None)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # [L, hd/2]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHLd: torch.Tensor, cos_Ld: torch.Tensor, sin_Ld: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by position-dependent angles."""
    x1, x2 = x_BHLd[..., 0::2], x_BHLd[..., 1::2]
    cos, sin = cos_Ld.to(x_BHLd.dtype), sin_Ld.to(x_BHLd.dtype)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    """Multi-query / grouped-query self-attention (n_kv_heads <= n_heads) through SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        hq, hkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        lora = {
            n: task_lora(cfg, d_in, d_out)
            for n, d_in, d_out in (
                ("q", cfg.d_model, hq),
                ("k", cfg.d_model, hkv),
                ("v", cfg.d_model, hkv),
                ("o", hq, cfg.d_model),
            )
        }
        self.lora = nn.ModuleDict(lora) if cfg.adapter_tasks else None

    def _proj(self, name: str, x: torch.Tensor, slot_B: torch.Tensor | None) -> torch.Tensor:
        y = getattr(self, f"w{name}")(x)
        return y if self.lora is None or slot_B is None else self.lora[name](x, y, slot_B)

    def forward(
        self,
        x_BLD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        slot_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """slot_B: each sequence's task-adapter slot (-1: none); None when the model has no adapters."""
        B, L, _ = x_BLD.shape
        q = self._proj("q", x_BLD, slot_B).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self._proj("k", x_BLD, slot_B).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self._proj("v", x_BLD, slot_B).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # Expanding K/V is a view plus one copy; SDPA's enable_gqa is not taken by every kernel.
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._proj("o", y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim), slot_B)


class ParallelBlock(nn.Module):
    """Pre-norm block with attention and FFN side by side (PaLM)."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.attn = Attention(cfg)
        self.ffn = ffn
        # a task's own small FFN beside the shared one (hidden 4 x adapter_rank)
        self.adapter = TaskFFN(cfg.d_model, 4 * cfg.adapter_rank, len(cfg.adapter_tasks)) if cfg.adapter_tasks else None

    def forward(
        self, x_BLD, cos, sin, mask, task_ids_BL, modality_ids_BL=None, slot_B=None
    ) -> tuple[torch.Tensor, Any]:
        """Returns (y, the FFN's output: its `.aux_loss` and `.stats` for the caller)."""
        h = self.norm(x_BLD)
        ffn_out = self.ffn(h, task_ids_BL, modality_ids_BL)
        y = x_BLD + self.attn(h, cos, sin, mask, slot_B) + ffn_out.out
        if self.adapter is not None and slot_B is not None:
            y = self.adapter(h, y, slot_B)
        return y, ffn_out


def attention_mask(prefix_len_B: torch.Tensor | None, L: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [B, 1, L, L] mask (True = may attend): causal, plus bidirectional inside the prefix.

    Returns None for a plain causal mask (SDPA's fast path).
    """
    if prefix_len_B is None:
        return None
    q = torch.arange(L, device=device)[:, None]
    k = torch.arange(L, device=device)[None, :]
    causal = k <= q  # [L, L]
    in_prefix = (k[None] < prefix_len_B[:, None, None]) & (q[None] < prefix_len_B[:, None, None])
    return (causal[None] | in_prefix)[:, None]
