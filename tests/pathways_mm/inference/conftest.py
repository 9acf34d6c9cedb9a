import pytest

from tests.helpers import MOE_CFG, run_cli, sets


@pytest.fixture(scope="session")
def image_run(tmp_path_factory, data_dir):
    """A few steps of the MoE debug model on an image task and a text task (no speech bank to build)."""
    out = tmp_path_factory.mktemp("inference") / "run"
    args = sets("tasks=[digit_image,text_arith]", "train.steps=4", "eval.max_samples=6", f"train.out_dir={out}")
    res = run_cli(["train", MOE_CFG, *args], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    return out
