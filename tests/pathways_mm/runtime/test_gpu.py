"""Training and checkpoints on a CUDA device. Skipped without CUDA; `make gpu-check` runs them (`pytest -m gpu`)."""

import pytest
import torch

from tests.helpers import MOE_CFG, read_metrics, run_cli, sets

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, data_dir):
    """Three full DeepSpeed steps of the MoE debug model on the GPU in bf16 (ZeRO-1, configs/ds/gpu_bf16.json)."""
    out = tmp_path_factory.mktemp("gpu") / "run"
    args = sets("train.ds_config=../ds/gpu_bf16.json", "train.steps=3", "train.log_every=1", "eval.max_samples=2")
    res = run_cli(["train", MOE_CFG, *args, *sets(f"train.out_dir={out}")], data_dir, timeout=600)
    return out, res


def test_full_deepspeed_step_on_cuda_in_bf16(gpu_run):
    out, res = gpu_run
    assert res.returncode == 0, res.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    assert (out / "checkpoints" / "step_0000003" / "pmm_manifest.json").is_file()


def test_checkpoint_saved_on_gpu_loads_on_cpu_with_equal_outputs(gpu_run, tmp_path, data_dir):
    """The same float32 forward of the stored weights on both devices: equal to 1e-3 (absolute, on
    logits of magnitude ~1; the devices sum matmuls in other orders, TF32 is off)."""
    out, res = gpu_run
    assert res.returncode == 0, res.stderr[-3000:]
    module = "tests.pathways_mm.runtime.logits_worker"
    on = {}
    for dev, env in (("cuda", {}), ("cpu", {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"})):
        res = run_cli([out, tmp_path / f"{dev}.pt"], data_dir, env_extra=env, module=module)
        assert res.returncode == 0, res.stderr[-3000:]
        on[dev] = torch.load(tmp_path / f"{dev}.pt", weights_only=True)
        assert on[dev]["device"] == dev
    assert "torch.bfloat16" in on["cpu"]["stored_dtypes"]  # DeepSpeed's bf16 engine stores bf16 weights
    a, b = on["cuda"]["logits"], on["cpu"]["logits"]
    assert a.shape == b.shape and a.abs().max() > 0.1
    assert (a - b).abs().max() <= 1e-3
