"""Task adapters (`add-task --adapter-rank R`): small weights owned by one task each, applied only
to that task's sequences, so every other task's outputs stay bit-identical.

Shape suffixes: B batch, L positions, I input width, O output width, N flat rows, D d_model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pathways_mm.config import ModelConfig


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
