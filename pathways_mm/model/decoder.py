"""The shared decoder: PaLM-style parallel blocks with MQA/GQA, RoPE, SwiGLU and tied embeddings.

Shape suffixes: B batch, L positions, D d_model, N scored positions, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pathways_mm.config import ModelConfig
from pathways_mm.model.adapters import is_adapter, task_lora
from pathways_mm.model.layers import ParallelBlock, SwiGLU, attention_mask, rope_tables


class DecoderOutput(NamedTuple):
    logits: torch.Tensor  # [B, L, V], or [N, V] at the N positions of `logits_at`
    aux_loss: torch.Tensor  # scalar, sum over layers (0 for a dense model)
    # "block{i}/{name}" -> detached scalar: each MoE layer's routing objectives, dropped routes, ...
    stats: dict[str, torch.Tensor]


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
        stats: dict[str, torch.Tensor] = {}
        slot_B = self.adapter_slot[task_ids_B] if self.cfg.adapter_tasks else None
        for i, block in enumerate(self.blocks):
            x, ffn_out = block(x, cos, sin, mask, task_ids_BL, modality_ids_BL, slot_B)
            if ffn_out.aux_loss is not None:
                aux_total = aux_total + ffn_out.aux_loss
            stats.update({f"block{i}/{name}": v for name, v in ffn_out.stats.items()})
        if logits_at_BL is not None:
            x = x[logits_at_BL]  # [N, D]
        h = self.norm(x)
        logits = F.linear(h, self.tok_embed.weight)  # tied input/output embeddings
        if slot_B is not None:
            slot_BL = slot_B[:, None].expand(B, L)
            slot_N = slot_BL[logits_at_BL] if logits_at_BL is not None else slot_BL.reshape(-1)
            logits = self.lm_adapter.rows(h.reshape(-1, h.shape[-1]), logits.reshape(-1, logits.shape[-1]), slot_N)
            logits = logits.view(*h.shape[:-1], -1)
        return DecoderOutput(logits, aux_total, stats)
