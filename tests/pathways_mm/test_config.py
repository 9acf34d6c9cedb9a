import dataclasses

import pytest

from pathways_mm.config import (
    SIZES,
    ExperimentConfig,
    ModelConfig,
    config_from_dict,
    load_config,
    parse_overrides,
    to_dict,
)
from pathways_mm.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_defaults_and_size_rows(tmp_path):
    cfg = load_config(write(tmp_path, "model: {size: tiny, n_layers: 3}\n"))
    assert cfg.model.d_model == SIZES["tiny"]["d_model"]
    assert cfg.model.n_layers == 3  # a key beside `size` overrides the row
    assert cfg.train.steps == ExperimentConfig().train.steps


def test_configs_are_frozen_and_keyword_only():
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ExperimentConfig("x")  # type: ignore[misc]


@pytest.mark.parametrize(
    "text,match",
    [
        ("trian: {steps: 3}\n", r"unknown config key 'trian'; did you mean 'train'\?"),
        ("train: {stpes: 3}\n", r"unknown config key 'train.stpes'; did you mean 'train.steps'|did you mean 'steps'"),
        ("model: {moe: {num_expert: 4}}\n", r"'model.moe.num_expert'.*num_experts"),
        ("train: {steps: ten}\n", r"train.steps: expected an integer, got str 'ten'"),
        ("train: {lr: true}\n", r"train.lr: expected a number"),
        ("model: {prefix_lm: 1}\n", r"model.prefix_lm: expected true or false"),
        ("tasks: text_lm\n", r"tasks: expected a list"),
        ("model: {size: huge}\n", r"unknown model size 'huge'"),
        ("model: {n_heads: 3}\n", r"divisible by model.n_heads"),
        ("model: {moe: {num_experts: 4, top_k: 5}}\n", r"top_k \(5\) must be between 1 and num_experts \(4\)"),
        (
            "model: {moe: {num_experts: 6, ep_size: 4}}\n",
            r"num_experts \(6\) must be divisible by model.moe.ep_size \(4\)",
        ),
        ("eval: {routes: true}\n", r"eval.routes: a dense model has no routes"),
        ("[1, 2]\n", r"expected a mapping"),
        ("train: [\n", r"not valid YAML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope/none.yaml")


def test_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, "train: {steps: 3}\n"), ["train.steps=7", "tasks=[text_lm]", "model.moe.capacity_factor=null"]
    )
    assert cfg.train.steps == 7 and cfg.tasks == ("text_lm",) and cfg.model.moe.capacity_factor is None
    assert parse_overrides(["a.b.c=1.5"]) == {"a": {"b": {"c": 1.5}}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="unknown config key 'train.setps'"):
        load_config(write(tmp_path, ""), ["train.setps=1"])


def test_round_trip_through_dict():
    cfg = ExperimentConfig()
    again = config_from_dict(to_dict(cfg))
    assert again == cfg


@pytest.mark.parametrize("path", ["configs/experiments/debug.yaml", "configs/experiments/demo.yaml"])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.tasks


def test_a_named_size_is_the_same_model_in_python_and_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {size: tiny, d_ff: 100}\n")
    assert load_config(tmp_path / "c.yaml").model == ModelConfig(size="tiny", d_ff=100)
    assert (
        ModelConfig(size="tiny").d_model == SIZES["tiny"]["d_model"] and ModelConfig(size="tiny", d_ff=100).d_ff == 100
    )
    with pytest.raises(ConfigError, match="unknown model size 'huge'"):
        ModelConfig(size="huge")
