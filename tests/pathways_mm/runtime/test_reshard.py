"""Resuming at another world size and ep_size, Adam moments of the experts included."""

import json

import pytest

from pathways_mm.errors import ConfigError
from pathways_mm.runtime.reshard import how_to_resume
from tests.helpers import MOE_CFG, ROOT, deepspeed_launch, read_metrics, run_cli, sets


def lay(world, ep, zero=0, dtype="fp32", names=(["a"],)):
    names = list(names) if names is not None else None
    return {"world_size": world, "ep_size": ep, "zero_stage": zero, "dtype": dtype, "optimizer_params": names}


@pytest.mark.parametrize(
    "saved,now,want",
    [
        (lay(4, 2), lay(4, 2), "deepspeed"),
        (lay(4, 2, zero=2, dtype="bf16"), lay(4, 2, zero=2, dtype="bf16"), "deepspeed"),
        (lay(4, 2), lay(2, 2), "deepspeed"),  # ZeRO-0 fp32: a file per expert-parallel rank, any world reads it
        (lay(4, 2), lay(2, 1), "reshard"),
        (lay(2, 1), lay(4, 4), "reshard"),
        (lay(4, 2, names=None), lay(2, 1), "records no optimizer parameter names"),
        (lay(4, 2, names=[[1]]), lay(2, 1), "records no optimizer parameter names"),
        (lay(4, 2, zero=1), lay(2, 2, zero=1), "cannot be moved to 2 processes, ep_size 2, ZeRO stage 1"),
        (lay(4, 2, dtype="bf16"), lay(4, 4, dtype="bf16"), "ZeRO-1/2 and bf16/fp16 optimizer states"),
        (lay(4, 2), lay(4, 2, zero=1), "saved with 4 processes, ep_size 2, ZeRO stage 0, fp32"),
        ({"world_size": "4"}, lay(4, 2), "lacks world_size, ep_size, zero_stage, dtype"),
        (None, {**lay(2, 2), "saved_ep_size": 2}, "deepspeed"),
        (None, {**lay(2, 1), "saved_ep_size": 2}, "resume it at model.moe.ep_size=2"),
    ],
)
def test_how_to_resume_reshards_only_a_plain_optimizer_and_refuses_the_rest(saved, now, want):
    if want in ("deepspeed", "reshard"):
        assert how_to_resume(saved, {"saved_ep_size": None, **now}, "META") == want
    else:
        with pytest.raises(ConfigError, match="^META: .*" + want.replace("(", r"\(")):
            how_to_resume(saved, {"saved_ep_size": None, **now}, "META")


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_moves_weights_and_adam_moments_between_world_sizes_and_ep_sizes(tmp_path, data_dir):
    """4 processes ep_size 2 -> 2 processes ep_size 1 -> 4 processes ep_size 4, one step each; every
    resumed step's loss, and the weights and Adam moments it ends with, equal what one process
    computes from the same checkpoint over the same ranks' batches.

    Gradient clipping is off: DeepSpeed 0.19.8 clips MoE models by the mean over ranks of each
    rank's gradient norm (dense + its own experts), which equals the global norm only at ep_size 1,
    so with clipping on, ep_size 4 and one process take slightly different steps (1e-3 apart).
    """
    out = tmp_path / "run"
    ds = {**json.loads((ROOT / "configs" / "ds" / "cpu.json").read_text()), "gradient_clipping": 0.0}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    common = sets("train.log_every=1", "train.keep_checkpoints=3", "eval.max_samples=1", f"train.out_dir={out}")
    common += sets(f"train.ds_config={tmp_path / 'ds.json'}")
    segments = [(4, 2, 1), (2, 1, 2), (4, 4, 3)]  # processes, ep_size, train.steps
    for procs, ep, steps in segments:
        args = ["train", MOE_CFG, *common, *sets(f"model.moe.ep_size={ep}", f"train.steps={steps}"), "--resume"]
        res = deepspeed_launch(procs, args, data_dir, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = read_metrics(out)
    logged = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert sorted(logged) == [1, 2, 3]
    assert [m["weights_in_sync"] for m in metrics if "weights_in_sync" in m] == [True, True, True]
    for procs, _, steps in segments[1:]:
        tags = [out / "checkpoints" / f"step_{s:07d}" for s in (steps - 1, steps)]
        res = run_cli(
            [MOE_CFG, *tags, procs, *common, *sets(f"train.steps={steps}")],
            data_dir,
            timeout=600,
            module="tests.pathways_mm.runtime.reshard_worker",
        )
        assert res.returncode == 0, res.stderr[-3000:]
        ref = json.loads(res.stdout.strip().splitlines()[-1])
        assert ref["losses"][str(steps)] == pytest.approx(logged[steps], rel=1e-5)
        assert ref["expert_moments"] == 3 and ref["moments"] > 3  # w1, w2, w3 of the one MoE layer (debug: 2 blocks)
        # float32 sums in another order (gloo all-reduce vs one process's accumulation): ~1e-6 apart
        assert max(ref["diffs"].values()) < 1e-4, ref["diffs"]
