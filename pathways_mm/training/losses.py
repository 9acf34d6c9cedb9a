"""The training objective: next-token loss on target tokens plus the model's aux losses.

Shape suffixes: B rows, L positions, N scored positions, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from pathways_mm.model.batch import IGNORE, Batch


class LossOutput(NamedTuple):
    loss: torch.Tensor  # what backward() sees: lm_loss + aux_loss
    lm_loss: (
        torch.Tensor
    )  # mean NLL per target token ("token"), of per-sample means ("example") or sqrt-weighted ("sqrt")
    aux_loss: torch.Tensor
    nll_B: torch.Tensor  # summed NLL (nats) per sample, detached
    num_tokens_B: torch.Tensor  # target tokens per sample
    stats: dict[str, torch.Tensor]  # the model's detached numbers for the log ("block3/mi", ...)


def forward_loss(model, batch: Batch, norm: str = "example") -> LossOutput:
    mask_BL = batch.labels != IGNORE
    out = model(batch, mask_BL)  # logits only where a target token is scored
    logits_NV = out.logits.float()  # loss math in float32 whatever the compute dtype
    nll_N = F.cross_entropy(logits_NV, batch.labels[mask_BL], reduction="none")
    nll_B = torch.zeros(mask_BL.shape[0], dtype=nll_N.dtype, device=nll_N.device).index_add(
        0, mask_BL.nonzero()[:, 0], nll_N
    )
    num_tokens_B = mask_BL.sum(1)
    if norm == "token":
        lm_loss = nll_B.sum() / num_tokens_B.sum().clamp(min=1)
    elif norm == "sqrt":
        # Between the two: a sample's mean NLL weighs sqrt(its target tokens), so a 70-token LM
        # chunk counts ~4x a 4-token answer instead of 1x ("example") or ~17x ("token").
        w_B = num_tokens_B.to(nll_B.dtype).sqrt()
        lm_loss = (w_B * nll_B / num_tokens_B.clamp(min=1)).sum() / w_B.sum().clamp(min=1e-6)
    else:
        has = num_tokens_B > 0
        lm_loss = (nll_B[has] / num_tokens_B[has]).sum() / has.sum().clamp(min=1)
    return LossOutput(lm_loss + out.aux_loss, lm_loss, out.aux_loss, nll_B.detach(), num_tokens_B, out.stats)
