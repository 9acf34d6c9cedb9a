"""Faults in real two-process runs (`deepspeed --num_gpus 2`, gloo): killed ranks, a silent rank,
a NaN gradient on one rank. Faults come from the test-only PMM_FAULT hook (pathways_mm/faults.py)."""

import os

import pytest

from pathways_mm.config import load_config
from pathways_mm.data.datasets import load_split
from pathways_mm.tasks import get_task
from tests.helpers import MOE_CFG, deepspeed_launch, read_metrics, sets

pytestmark = pytest.mark.distributed

COMMON = [
    "train",
    MOE_CFG,
    *sets(
        "model.moe.ep_size=2",
        "train.steps=6",
        "train.save_every=2",
        "train.log_every=1",
        "eval.max_samples=4",
        "train.collective_timeout_s=20",
    ),
]


def launch(out, data_dir, fault=None, extra=(), timeout=600):
    env = {"PMM_FAULT": fault} if fault else {}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # deepspeed_launch passes os.environ on to the ranks
    try:
        return deepspeed_launch(2, [*COMMON, *sets(f"train.out_dir={out}"), *extra], data_dir, timeout=timeout)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def prebuilt(data_dir):
    """Build the datasets once here, so that no launch spends its time on it."""
    cfg = load_config(MOE_CFG)
    for name in cfg.tasks:
        for split in ("train", "test"):
            load_split(get_task(name), split, data_dir, cfg.data.seed)
    return data_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prebuilt):
    out = tmp_path_factory.mktemp("uninterrupted")
    res = launch(out, prebuilt)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill:rank=1:step=4", "kill_during_save:rank=1:step=4"])
def test_sigkill_of_a_rank_then_resume_matches_uninterrupted_run(fault, tmp_path, prebuilt, reference):
    out = tmp_path / "run"
    res = launch(out, prebuilt, fault)
    assert res.returncode != 0, "the launcher must report the killed rank"
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000002"  # the last checkpoint that was complete
    if fault.startswith("kill_during_save"):
        assert (ckpts / "step_0000004").is_dir() and not (ckpts / "step_0000004" / "pmm_manifest.json").exists()
    res = launch(out, prebuilt, extra=["--resume"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    if fault.startswith("kill_during_save"):
        assert "step_0000004: its save did not finish" in res.stderr
    assert "steps 2->6" in res.stderr
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(3, 7):  # same batches, same weights and optimizer state: the same losses
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, resumed, reference)
    assert len(set(reference.values())) > 3


def test_a_rank_that_stops_answering_is_named(tmp_path, prebuilt):
    out = tmp_path / "hang"
    res = launch(out, prebuilt, "hang:rank=1:step=2", [*sets("train.collective_timeout_s=5")], timeout=240)
    assert res.returncode != 0
    errors = [line for line in (res.stdout + res.stderr).splitlines() if "pathways-mm: error:" in line]
    assert errors and "rank 1 stopped answering at step 2" in errors[0], res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr


def test_nan_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path, prebuilt):
    out = tmp_path / "nan"
    res = launch(out, prebuilt, "nan_grad:rank=1:step=2", [*sets("train.steps=3", "train.save_every=0")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = read_metrics(out)
    assert [r["step"] for r in records if "skipped" in r] == [2]
    assert sorted(losses(out)) == [1, 3]
    assert records[-1]["weights_in_sync"] is True  # rank 0 did not step alone
