import json

import pytest
import torch
import torch.nn.functional as F

from pathways_mm.bench.moe import REFERENCE, SortGroupedMM, run_moe, saved_bytes


def test_bench_moe_prints_every_row(capsys, tmp_path):
    rows = run_moe("cpu", tokens=64, iters=1, warmup=0, json_out=str(tmp_path / "moe.json"))
    assert [r.name.split(" (")[0] for r in rows] == [
        "dense SwiGLU",
        "PathwaysMoE grouped",
        "PathwaysMoE deepspeed",
        "DeepSpeed MoE stock",
    ]
    assert all(r.ms > 0 for r in rows)
    out = capsys.readouterr().out
    assert "vs dense" in out and "saved KiB/tok" in out
    assert all(r.saved_bytes > 0 for r in rows)
    assert all(r.peak_bytes is None for r in rows)  # CUDA only
    assert f"skipped {REFERENCE}: torch._grouped_mm needs CUDA sm90+ in bf16" in out
    written = json.loads((tmp_path / "moe.json").read_text())
    assert [r["name"] for r in written["rows"]] == [r.name for r in rows] and written["tokens"] == 64
    assert written["rows"][1]["ms"] == rows[1].ms and len(written["skipped"]) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sort_grouped_mm_reference_equals_a_loop_over_tokens(dtype):
    """The reference row's layer (timed on CUDA sm90 only): its forward on the CPU's _grouped_mm
    against top-k routing written token by token."""
    torch.manual_seed(0)
    layer = SortGroupedMM(16, 24, 4, 2).to(dtype)
    x_BLD = torch.randn(2, 9, 16, dtype=dtype)
    want = torch.zeros(18, 16)
    for t, x in enumerate(x_BLD.reshape(-1, 16).float()):
        probs = (layer.gate.weight.float() @ x).softmax(-1)
        w, e = probs.topk(2)
        for weight, expert in zip(w / w.sum(), e):
            w1, w3, w2 = (getattr(layer, n).weight[expert].float() for n in ("w1", "w3", "w2"))
            want[t] += weight * (w2 @ (F.silu(w1 @ x) * (w3 @ x)))
    got = layer(x_BLD).float().reshape(-1, 16)
    torch.testing.assert_close(got, want, **({} if dtype == torch.float32 else {"atol": 0.03, "rtol": 0.03}))


def test_grouped_moe_saves_at_most_1_2x_the_dense_ffn_per_token():
    rows = run_moe("cpu", tokens=256, iters=1, warmup=0)
    dense, grouped = rows[0], rows[1]
    assert grouped.saved_bytes <= 1.2 * dense.saved_bytes, (grouped.saved_bytes, dense.saved_bytes)


def test_saved_bytes_counts_activations_once_and_not_parameters():
    lin = torch.nn.Linear(8, 16, bias=False)
    x = torch.randn(5, 8)
    assert saved_bytes(lin, lambda layer, x: layer(x), x) == 5 * 8 * 4  # the input only: weight left out

    def twice(layer, x):
        return layer(x) + layer(x)  # both linears save the same input storage

    assert saved_bytes(lin, twice, x) == 5 * 8 * 4
    # relu saves its output: one more [5, 16] float32 buffer
    assert saved_bytes(lin, lambda layer, x: torch.relu(layer(x)), x) == 5 * 8 * 4 + 5 * 16 * 4
