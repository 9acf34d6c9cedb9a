"""Running a trained model: greedy decoding and teacher-forced target logits.

Shape suffixes: B batch, L positions, D d_model.
"""

from __future__ import annotations

import dataclasses

import torch

from pathways_mm.model.batch import IGNORE, PAD_MODALITY, TEXT, Batch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The PathwaysModel inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


@torch.no_grad()
def greedy_generate(model, batch: Batch, max_new_tokens: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """Greedy decoding from each prefix; always runs `max_new_tokens` forwards (ranks stay in step).

    The multimodal prefix is embedded once; each step appends the new tokens' embeddings.
    """
    net = unwrap(model)
    B = len(batch)
    dev = batch.tokens.device
    x_BLD = net.embed(batch)
    lengths = batch.lengths.clone()
    out: list[list[int]] = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    step = dataclasses.replace(batch)
    for _ in range(max_new_tokens):
        last_BL = torch.zeros(step.tokens.shape, dtype=torch.bool, device=dev)
        last_BL[rows, lengths - 1] = True
        nxt = net.run(x_BLD, step, last_BL).logits.argmax(-1)  # [B]: row-major order is row order
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        step.tokens = torch.cat([step.tokens, torch.full((B, 1), pad_id, dtype=step.tokens.dtype, device=dev)], dim=1)
        # route telemetry reads one modality id per position: a generated token is text, the rest padding
        step.modality_ids = torch.cat(
            [step.modality_ids, torch.full_like(step.modality_ids[:, :1], PAD_MODALITY)], dim=1
        )
        step.modality_ids[rows, lengths] = TEXT
        step.tokens[rows, lengths] = nxt
        x_BLD = torch.cat([x_BLD, x_BLD.new_zeros(B, 1, x_BLD.shape[-1])], dim=1)
        x_BLD[rows, lengths] = net.decoder.tok_embed(nxt).to(x_BLD.dtype)
        for i in (~finished).nonzero().flatten().tolist():
            if nxt[i].item() != eos_id:
                out[i].append(nxt[i].item())
        finished |= nxt == eos_id
        lengths = lengths + 1
    return out


@torch.no_grad()
def target_logits(model, batch: Batch) -> torch.Tensor:
    """Logits at the target positions (eval mode, float32, on the CPU): what a task's metrics are made of."""
    was = model.training
    model.eval()
    dev = next(unwrap(model).parameters()).device
    batch = batch.to(dev)
    out = model(batch, logits_at_BL=batch.labels != IGNORE).logits
    model.train(was)
    return out.float().cpu()
