from pathways_mm.bench import bench_moe


def test_bench_moe_prints_every_row(capsys):
    rows = bench_moe(["--config", "cpu", "--tokens", "64", "--iters", "1", "--warmup", "0"])
    assert [r.name.split(" (")[0] for r in rows] == [
        "dense SwiGLU", "PathwaysMoE grouped", "PathwaysMoE deepspeed", "DeepSpeed MoE stock"
    ]
    assert all(r.ms > 0 for r in rows)
    assert "vs dense" in capsys.readouterr().out
