import torch

from pathways_mm.bench.moe import run_moe, saved_bytes


def test_bench_moe_prints_every_row(capsys):
    rows = run_moe("cpu", tokens=64, iters=1, warmup=0)
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
