"""DeepSpeed settings: the built-in ones unless the experiment names a JSON file."""

import json

from pathways_mm.config import load_config
from pathways_mm.runtime.engine import deepspeed_config
from tests.helpers import ROOT


def test_a_config_outside_the_repository_needs_no_deepspeed_json(tmp_path):
    """The old default, ../ds/cpu.json next to the experiment file, existed only inside the repository."""
    (tmp_path / "exp.yaml").write_text("tasks: [text_lm]\ntrain: {micro_batch_size: 4, lr: 1e-3}\n")
    cfg = load_config(tmp_path / "exp.yaml")
    ds = deepspeed_config(cfg, world_size=1)
    shipped = json.loads((ROOT / "configs" / "ds" / "cpu.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["optimizer"]["params"]["lr"] == 1e-3
    assert {
        k: v
        for k, v in ds.items()
        if k not in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer")
    } == {
        k: v
        for k, v in shipped.items()
        if k not in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer")
    }
    assert ds["optimizer"]["params"]["betas"] == shipped["optimizer"]["params"]["betas"]
    named = load_config(tmp_path / "exp.yaml", [f"train.ds_config={ROOT / 'configs' / 'ds' / 'cpu.json'}"])
    assert deepspeed_config(named, world_size=1) == ds  # the shipped cpu.json says the same
