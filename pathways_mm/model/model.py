"""Model assembly: `build_model(cfg, vocab_size)` returns a plain `nn.Module` (no DeepSpeed here).

`PathwaysModel` = modality encoders + the decoder. It builds the multimodal sentence (token
embeddings, task token, modality markers, image and audio embeddings at their slots) and runs
the decoder on it.

Shape suffixes: B batch, L positions, D d_model, T flat positions (B*L), N media items,
P embeddings per item.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pathways_mm.config import ModelConfig
from pathways_mm.encoders.audio import AudioEncoder
from pathways_mm.encoders.vision import VisionEncoder
from pathways_mm.model.batch import Batch
from pathways_mm.model.decoder import Decoder, DecoderOutput, FFNFactory, dense_ffn
from pathways_mm.model.layers import SwiGLU
from pathways_mm.routing.moe import PathwaysMoE, moe_layers
from pathways_mm.tasks.base import MODALITIES


class PathwaysModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, ffn_factory: FFNFactory = dense_ffn):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg, vocab_size, ffn_factory=ffn_factory)
        self.vision = VisionEncoder(cfg.vision, cfg.d_model)
        self.audio = AudioEncoder(cfg.audio, cfg.d_model)
        self.marker_embed = nn.Embedding(2 * len(MODALITIES), cfg.d_model)  # start/end per modality
        nn.init.normal_(self.marker_embed.weight, std=cfg.init_std)

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    def embed(self, batch: Batch) -> torch.Tensor:
        """The multimodal sentence `[B, L, D]` before the first block."""
        x_BLD = self.decoder.embed(batch.tokens, batch.task_ids)
        B, L, D = x_BLD.shape
        has_marker = batch.markers >= 0
        x_BLD = torch.where(has_marker[..., None], self.marker_embed(batch.markers.clamp(min=0)).to(x_BLD.dtype), x_BLD)
        x_TD = x_BLD.reshape(B * L, D)
        if batch.images is not None:
            emb, mask = self.vision(batch.images.to(x_TD.dtype), batch.image_widths)
            x_TD = self._place(x_TD, emb, mask, batch.image_slots)
        if batch.audio is not None:
            emb, mask = self.audio(batch.audio, batch.audio_lengths, batch.audio_masks)
            x_TD = self._place(x_TD, emb, mask, batch.audio_slots)
        return x_TD.view(B, L, D)

    @staticmethod
    def _place(
        x_TD: torch.Tensor, emb_NPD: torch.Tensor, mask_NP: torch.Tensor, slots_NP: torch.Tensor
    ) -> torch.Tensor:
        P = min(emb_NPD.shape[1], slots_NP.shape[1])
        take = mask_NP[:, :P] & (slots_NP[:, :P] >= 0)
        # collate and the encoder count a clip's embeddings the same way; a mismatch is a bug
        assert bool((take.sum(1) == (slots_NP >= 0).sum(1)).all()), "encoder and collate disagree on media length"
        return x_TD.index_copy(0, slots_NP[:, :P][take], emb_NPD[:, :P][take].to(x_TD.dtype))

    def run(self, x_BLD: torch.Tensor, batch: Batch, logits_at_BL: torch.Tensor | None = None) -> DecoderOutput:
        """The decoder over already-embedded inputs (greedy decoding re-uses one embedding)."""
        return self.decoder(
            batch.tokens,
            batch.task_ids,
            batch.prefix_len,
            inputs_embeds_BLD=x_BLD,
            logits_at_BL=logits_at_BL,
            modality_ids_BL=batch.modality_ids,
        )

    def forward(self, batch: Batch, logits_at_BL: torch.Tensor | None = None) -> DecoderOutput:
        return self.run(self.embed(batch), batch, logits_at_BL)


def block_ffn(layer: int, cfg: ModelConfig) -> nn.Module:
    """The FFN of decoder block `layer`: a PathwaysMoE on every moe_every-th block, else dense SwiGLU."""
    m = cfg.moe
    if m.num_experts > 0 and (layer + 1) % m.moe_every == 0:
        return PathwaysMoE.from_config(cfg)
    return SwiGLU(cfg.d_model, cfg.d_ff)


def build_model(cfg: ModelConfig, vocab_size: int) -> PathwaysModel:
    """Encoders + decoder; every `moe.moe_every`-th FFN is a PathwaysMoE when `moe.num_experts > 0`."""
    return PathwaysModel(cfg, vocab_size, ffn_factory=block_ffn)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active) parameters over all ranks: a token touches top_k of each layer's experts."""
    total = active = sum(p.numel() for p in model.parameters())
    for _, m in moe_layers(model):
        per_expert = sum(p.numel() for p in m.expert_params()) // m.num_local_experts
        total += per_expert * (m.num_experts - m.num_local_experts)  # experts held by other ranks
        active -= per_expert * (m.num_local_experts - m.top_k)
    return total, active
