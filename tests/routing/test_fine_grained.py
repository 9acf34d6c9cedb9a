"""Fine-grained experts (16 and 32 per layer) with a shared expert: masks, route telemetry, the
routes pictures and cutting a layer for a task's export all work at these counts."""

import pytest
import torch

from pathways_mm import routes_file
from pathways_mm.config import ExperimentConfig, ModelConfig, MoEConfig
from pathways_mm.routing import PathwaysMoE, telemetry
from pathways_mm.routing.pathways import restrict_experts
from pathways_mm.viz.draw import draw

TASKS = ("a", "b", "c")


@pytest.mark.parametrize("E,k", [(16, 4), (32, 8)])
def test_fine_grained_layer_masks_routes_pictures_and_export(E, k, tmp_path):
    torch.manual_seed(0)
    D = 16
    moe = PathwaysMoE(D, 8, E, 4, k, shared_d_ff=16, mi_coef=0.005, mask_mass=0.95, mask_step=2, mask_window=2)
    with torch.no_grad():
        moe.router.pathway.normal_(std=2.0)  # tasks prefer different experts
    task_BL = torch.arange(3).repeat_interleave(4)[:, None].expand(12, 6)
    moe.train()
    for _ in range(2):  # the second training forward ends the window: every task gets its mask
        moe(torch.randn(12, 6, D), task_BL)
    allowed = moe.router.allowed[:3].sum(1)
    assert ((allowed >= k) & (allowed <= E // 2)).all(), allowed  # mask_max_experts: half the pool
    moe.eval()
    telemetry.enable(moe)
    x = torch.randn(12, 6, D)
    with torch.no_grad():
        moe(x, task_BL)
        with telemetry.paused(moe):
            full_a = moe(x[:4], task_BL[:4]).out  # task a's rows alone, as export's parity run
    counts, stats = moe.route_counts.clone(), moe.token_stats.clone()
    reached = counts[0, 0].sum(0).nonzero().flatten().tolist()
    assert set(reached) <= set(moe.router.allowed[0].nonzero().flatten().tolist())

    cfg = ExperimentConfig(tasks=TASKS, model=ModelConfig(n_layers=2, moe=MoEConfig(num_experts=E, top_k=k)))
    doc = routes_file.document([(1, counts, stats)], cfg, list(TASKS), {"path": None}, {"split": "test"})
    path = routes_file.write(tmp_path / "routes.json", doc)
    written = draw(path, tmp_path / "fig")
    page = written[-1].read_text()
    assert written[-1].name == "routes.html" and f"expert {E - 1}" in page and "off=" in page

    restrict_experts(moe, reached)  # task a's export: the experts it reached, and the shared expert whole
    assert moe.experts.w1.weight.shape[0] == len(reached) and moe.shared is not None
    with torch.no_grad():
        cut = moe(x[:4], task_BL[:4]).out
    assert torch.equal(cut, full_a)  # task a's outputs bit for bit, shared expert included
