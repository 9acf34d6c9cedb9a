"""The shared decoder: PaLM-style parallel blocks with MQA/GQA, RoPE, SwiGLU and tied embeddings.

Every block computes `y = x + attn(norm(x)) + ffn(norm(x))`. The FFN is a swappable part: any
module whose forward takes `(x_BLD, task_ids_BL, modality_ids_BL)` and returns an `FFNOutput`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pathways_mm.config import ModelConfig


class FFNOutput(NamedTuple):
    out: torch.Tensor  # [B, L, D]
    aux_loss: torch.Tensor | None  # scalar added to the training loss (MoE balance, z-loss)


class DecoderOutput(NamedTuple):
    logits: torch.Tensor  # [B, L, V], or [N, V] at the N positions of `logits_at`
    aux_loss: torch.Tensor  # scalar, sum over layers (0 for a dense model)


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None,
                modality_ids: torch.Tensor | None = None) -> FFNOutput:
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


class TaskLoRA(nn.Module):
    """Low-rank updates owned by single tasks: `y + (x A_s) B_s` on the rows (sequences) whose
    task holds adapter slot s, `y` itself, bit for bit, on every other row.

    B starts at zero, so a new slot changes nothing until it trains.
    """

    def __init__(self, d_in: int, d_out: int, slots: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(slots, d_in, rank) / math.sqrt(d_in))
        self.B = nn.Parameter(torch.zeros(slots, rank, d_out))

    def forward(self, x_BLI: torch.Tensor, y_BLO: torch.Tensor, slot_B: torch.Tensor) -> torch.Tensor:
        s = slot_B.clamp(min=0)
        delta = torch.bmm(torch.bmm(x_BLI, self.A[s].to(x_BLI.dtype)), self.B[s].to(x_BLI.dtype))
        return torch.where((slot_B >= 0)[:, None, None], y_BLO + delta.to(y_BLO.dtype), y_BLO)

    def rows(self, x_NI: torch.Tensor, y_NO: torch.Tensor, slot_N: torch.Tensor) -> torch.Tensor:
        """The same on flat rows (e.g. the LM head's scored positions), one slot at a time:
        gathering a [rows, rank, out] B per row would not fit for a vocabulary-wide output."""
        for s in range(self.A.shape[0]):
            delta = (x_NI @ self.A[s].to(x_NI.dtype)) @ self.B[s].to(x_NI.dtype)
            y_NO = torch.where((slot_N == s)[:, None], y_NO + delta.to(y_NO.dtype), y_NO)
        return y_NO


class TaskFFN(nn.Module):
    """A small SwiGLU FFN owned by one task per slot, added to its rows' block output only
    (`y + w2_s(silu(w1_s h) * w3_s h)`); other rows keep `y` bit for bit. w2 starts at zero.

    Low-rank linear updates cannot learn a lookup such as the sum of two digits; the new
    task's experts could, but its tokens mostly keep using the old ones.
    """

    def __init__(self, d_model: int, hidden: int, slots: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(slots, d_model, hidden) / math.sqrt(d_model))
        self.w3 = nn.Parameter(torch.randn(slots, d_model, hidden) / math.sqrt(d_model))
        self.w2 = nn.Parameter(torch.zeros(slots, hidden, d_model))

    def forward(self, h_BLD: torch.Tensor, y_BLD: torch.Tensor, slot_B: torch.Tensor) -> torch.Tensor:
        s = slot_B.clamp(min=0)
        w1, w3, w2 = (w[s].to(h_BLD.dtype) for w in (self.w1, self.w3, self.w2))
        delta = torch.bmm(F.silu(torch.bmm(h_BLD, w1)) * torch.bmm(h_BLD, w3), w2)
        return torch.where((slot_B >= 0)[:, None, None], y_BLD + delta.to(y_BLD.dtype), y_BLD)


def is_adapter(name: str) -> bool:
    """Whether a parameter belongs to a task adapter (`[slots, ...]`, one slot per owning task)."""
    return any(part in ("lora", "adapter", "lm_adapter") for part in name.split("."))


def task_lora(cfg: ModelConfig, d_in: int, d_out: int) -> TaskLoRA | None:
    return TaskLoRA(d_in, d_out, len(cfg.adapter_tasks), cfg.adapter_rank) if cfg.adapter_tasks else None


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
        lora = {n: task_lora(cfg, d_in, d_out) for n, d_in, d_out in
                (("q", cfg.d_model, hq), ("k", cfg.d_model, hkv), ("v", cfg.d_model, hkv), ("o", hq, cfg.d_model))}
        self.lora = nn.ModuleDict(lora) if cfg.adapter_tasks else None  # fmt: skip

    def _proj(self, name: str, x: torch.Tensor, slot_B: torch.Tensor | None) -> torch.Tensor:
        y = getattr(self, f"w{name}")(x)
        return y if self.lora is None or slot_B is None else self.lora[name](x, y, slot_B)

    def forward(self, x_BLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                slot_B: torch.Tensor | None = None) -> torch.Tensor:
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

    def forward(self, x_BLD, cos, sin, mask, task_ids_BL, modality_ids_BL=None,
                slot_B=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.norm(x_BLD)
        ffn_out = self.ffn(h, task_ids_BL, modality_ids_BL)
        y = x_BLD + self.attn(h, cos, sin, mask, slot_B) + ffn_out.out
        if self.adapter is not None and slot_B is not None:
            y = self.adapter(h, y, slot_B)
        return y, ffn_out.aux_loss


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


FFNFactory = Callable[[int, ModelConfig], nn.Module]


def dense_ffn(layer: int, cfg: ModelConfig) -> nn.Module:
    return SwiGLU(cfg.d_model, cfg.d_ff)


class Decoder(nn.Module):
    """Token + task embeddings, parallel blocks, final norm, LM head tied to the token embedding.

    Position 0 of every sequence is the task token: its embedding is `task_embed[task_id]`.
    `prefix_len_B` (task token + modality embeddings + prompt) attends bidirectionally when
    `cfg.prefix_lm`; everything else is causal.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, ffn_factory: FFNFactory = dense_ffn):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tok_embed = nn.Embedding(vocab_size, cfg.d_model)
        self.task_embed = nn.Embedding(cfg.max_tasks, cfg.d_model)
        self.blocks = nn.ModuleList(ParallelBlock(cfg, ffn_factory(i, cfg)) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        slots = torch.full((cfg.max_tasks,), -1, dtype=torch.long)  # task id -> adapter slot
        slots[list(cfg.adapter_tasks)] = torch.arange(len(cfg.adapter_tasks))
        self.register_buffer("adapter_slot", slots, persistent=False)
        # A task's own low-rank update of the tied LM head: a token no old task ever wrote has an
        # untrained, near-zero embedding that the frozen head cannot make win (e.g. "+", "=").
        self.lm_adapter = task_lora(cfg, cfg.d_model, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2 or "pathway" in name or is_adapter(name):
                continue  # pathway priors start at 0 (no task prefers an expert yet); adapters keep their init
            # Output projections scaled by depth (GPT-2): the residual stream's variance stays flat.
            scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def embed(self, tokens_BL: torch.Tensor, task_ids_B: torch.Tensor) -> torch.Tensor:
        x = self.tok_embed(tokens_BL)
        return torch.cat([self.task_embed(task_ids_B)[:, None], x[:, 1:]], dim=1)

    def forward(
        self,
        tokens_BL: torch.Tensor,
        task_ids_B: torch.Tensor,
        prefix_len_B: torch.Tensor | None = None,
        inputs_embeds_BLD: torch.Tensor | None = None,
        logits_at_BL: torch.Tensor | None = None,
        modality_ids_BL: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """`logits_at_BL` (bool) limits the LM head to those positions: most tasks score a few
        target tokens, and the head over a 4k vocabulary at every position would cost more than
        the blocks. `modality_ids_BL`: int64 index into MODALITIES per position, -1 at padding;
        read by the MoE layers' route telemetry only (None = all text, no padding)."""
        B, L = tokens_BL.shape
        if L > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {L} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens_BL, task_ids_B) if inputs_embeds_BLD is None else inputs_embeds_BLD
        mask = attention_mask(prefix_len_B, L, x.device) if self.cfg.prefix_lm else None
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]
        task_ids_BL = task_ids_B[:, None].expand(B, L)  # every token carries its task to the routers
        aux_total = x.new_zeros(())
        slot_B = self.adapter_slot[task_ids_B] if self.cfg.adapter_tasks else None
        for block in self.blocks:
            x, aux = block(x, cos, sin, mask, task_ids_BL, modality_ids_BL, slot_B)
            if aux is not None:
                aux_total = aux_total + aux
        if logits_at_BL is not None:
            x = x[logits_at_BL]  # [N, D]
        h = self.norm(x)
        logits = F.linear(h, self.tok_embed.weight)  # tied input/output embeddings
        if slot_B is not None:
            slot_BL = slot_B[:, None].expand(B, L)
            slot_N = slot_BL[logits_at_BL] if logits_at_BL is not None else slot_BL.reshape(-1)
            logits = self.lm_adapter.rows(h.reshape(-1, h.shape[-1]), logits.reshape(-1, logits.shape[-1]), slot_N)
            logits = logits.view(*h.shape[:-1], -1)
        return DecoderOutput(logits, aux_total)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embed.weight.numel() + self.task_embed.weight.numel()
        return n
