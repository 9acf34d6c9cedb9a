import math
from types import SimpleNamespace

import pytest
import torch

from pathways_mm.model.batch import IGNORE
from pathways_mm.training.losses import forward_loss

V = 5


class _FixedNLL(torch.nn.Module):
    """Logits at the scored positions that give the target tokens the NLLs `nll_N` (in order)."""

    def __init__(self, nll_N):
        super().__init__()
        self.nll_N = torch.tensor(nll_N, dtype=torch.float64)

    def forward(self, batch, mask_BL):
        # target token 0 gets logit z, the other V-1 get 0: nll = log(e^z + V - 1) - z
        p_N = torch.exp(-self.nll_N)
        z_N = torch.log(p_N * (V - 1) / (1 - p_N))
        logits_NV = torch.zeros(len(z_N), V, dtype=torch.float64)
        logits_NV[:, 0] = z_N
        return SimpleNamespace(logits=logits_NV, aux_loss=torch.zeros((), dtype=torch.float64), stats={})


@pytest.mark.parametrize("norm", ["example", "token", "sqrt"])
def test_loss_norms_hand_computed(norm):
    # Sample 0: one target token (NLL 2.0); sample 1: four target tokens (NLL 0.5 each); sample 2: none.
    labels = torch.full((3, 6), IGNORE)
    labels[0, 5] = 0
    labels[1, 2:6] = 0
    model = _FixedNLL([2.0, 0.5, 0.5, 0.5, 0.5])
    out = forward_loss(model, SimpleNamespace(labels=labels), norm)
    want = {
        "example": (2.0 + 0.5) / 2,
        "token": (2.0 + 4 * 0.5) / 5,
        "sqrt": (1 * 2.0 + 2 * 0.5) / (1 + 2),  # weights sqrt(1), sqrt(4); the empty sample weighs 0
    }[norm]
    assert out.lm_loss.item() == pytest.approx(want, rel=1e-6)  # loss math runs in float32
    assert out.num_tokens_B.tolist() == [1, 4, 0] and math.isfinite(out.loss.item())
