"""The training objective: next-token loss on target tokens plus the model's aux losses."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from pathways_mm.data import IGNORE, Batch, modality_ids


class LossOutput(NamedTuple):
    loss: torch.Tensor  # what backward() sees: lm_loss + aux_loss
    lm_loss: torch.Tensor  # mean NLL per target token ("token") or of per-sample means ("example")
    aux_loss: torch.Tensor
    nll_B: torch.Tensor  # summed NLL (nats) per sample, detached
    num_tokens_B: torch.Tensor  # target tokens per sample


def forward_loss(model, batch: Batch, norm: str = "example", modality_ids_BL: torch.Tensor | None = None) -> LossOutput:
    """modality_ids_BL: per-position modality ids for route telemetry (default: `modality_ids(batch)`)."""
    mods_BL = modality_ids(batch) if modality_ids_BL is None else modality_ids_BL
    out = model(batch.tokens, batch.task_ids, batch.prefix_len, modality_ids_BL=mods_BL)
    logits_BLV = out.logits.float()  # loss math in float32 whatever the compute dtype
    nll_BL = F.cross_entropy(logits_BLV.transpose(1, 2), batch.labels, ignore_index=IGNORE, reduction="none")
    mask_BL = batch.labels != IGNORE
    num_tokens_B = mask_BL.sum(1)
    nll_B = nll_BL.sum(1)
    if norm == "token":
        lm_loss = nll_B.sum() / num_tokens_B.sum().clamp(min=1)
    else:
        has = num_tokens_B > 0
        lm_loss = (nll_B[has] / num_tokens_B[has]).sum() / has.sum().clamp(min=1)
    return LossOutput(lm_loss + out.aux_loss, lm_loss, out.aux_loss, nll_B.detach(), num_tokens_B)
