import dataclasses
import re

import pytest

from pathways_mm.config import (
    RANGES,
    SIZES,
    USER_ONLY_KEYS,
    ExperimentConfig,
    ModelConfig,
    config_from_dict,
    from_checkpoint,
    load_config,
    parse_overrides,
    to_dict,
)
from pathways_mm.errors import ConfigError
from tests.helpers import ROOT


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


DECLARE = "declare: {own: {inputs: {image: image}, target: label, splits: {train: {path: a/train.jsonl}}}}\n"


@pytest.mark.parametrize(
    "text,match",
    [
        (
            DECLARE.replace("image: image", "image: video"),
            r"declare.own.inputs: unknown modalities \{'image': 'video'\}",
        ),
        (DECLARE.replace("target: label", "target: ''"), r"declare.own.target: name the field"),
        (DECLARE.replace("train:", "test:"), r"declare.own.splits: give at least a train source"),
        (
            DECLARE.replace("path: a/train.jsonl", "path: a.jsonl, format: tsv"),
            r"declare.own.splits.train.format: 'tsv'",
        ),
        (DECLARE.replace("target: label", "target: label, metrics: [bleu]"), r"declare.own.metrics: \['bleu'\]"),
        (DECLARE.replace("own:", "my-task:"), r"declare.my-task: a task name must be identifier-like"),
        (DECLARE.replace("target: label", "target: label, prompts: x"), r"unknown config key 'declare.own.prompts'"),
        ("data: {on_bad_sample: ignore}\n", r"data.on_bad_sample: 'ignore' is not 'error' or 'skip'"),
        ("data: {max_bad_fraction: 1.0}\n", r"data.max_bad_fraction must be within \[0, 1\)"),
        ("data: {num_workers: -1}\n", r"data.num_workers must be between 0 and 1024"),
    ],
)
def test_bad_declarations_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_declared_paths_are_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    cfg = load_config(write(tmp_path / "sub", DECLARE), ["declare.own.splits.test.path=b/test.jsonl"])
    splits = cfg.declare["own"].splits
    assert splits["train"].path == str(tmp_path / "sub" / "a" / "train.jsonl")  # next to the YAML
    assert splits["test"].path == str(tmp_path / "b" / "test.jsonl")  # --set: the working directory
    assert config_from_dict(to_dict(cfg)).declare == cfg.declare  # as a checkpoint stores and reads it


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
        load_config(write(tmp_path, "name: x\n"), ["train.setps=1"])


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


def test_numbers_people_write_parse(tmp_path):
    """`--set train.lr=1e-3` is the example of `add-task --help`; YAML 1.1 reads 1e-3 as a string."""
    cfg = load_config(write(tmp_path, "train: {lr: 2e-3}\n"), ["train.min_lr_ratio=1e-1"])
    assert cfg.train.lr == 0.002 and cfg.train.min_lr_ratio == 0.1
    assert parse_overrides(["train.lr=1e-3"]) == {"train": {"lr": 0.001}}


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "{}\n", "---\n"])
def test_an_empty_config_is_refused_not_run_with_defaults(tmp_path, text):
    with pytest.raises(ConfigError, match="empty config; an experiment YAML holds what differs"):
        load_config(write(tmp_path, text))


def test_a_duplicate_key_is_refused_naming_both_lines(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'steps' appears twice \(also on line 2\).*line 3"):
        load_config(write(tmp_path, "train:\n  steps: 3\n  steps: 5\n"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.max_seq_len=10000000000", "model.max_seq_len must be between 1 and 65536, got 10000000000"),
        ("train.micro_batch_size=100000000000", "train.micro_batch_size must be between 1 and 65536"),
        ("seed=-1", "seed must be between 0 and"),
        ("data.seed=-1", "data.seed must be between 0 and"),
        ("train.collective_timeout_s=1e300", "train.collective_timeout_s must be > 0 and <= 604800"),
        ("train.lr=0", "train.lr must be > 0 and <= 10"),
        ("model.moe.capacity_factor=-1.0", "model.moe.capacity_factor must be > 0"),
        ("eval.max_samples=-1", "eval.max_samples must be between 0 and"),
    ],
)
def test_values_that_would_crash_later_are_refused_up_front(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, "name: x\n"), [override])


def test_every_range_holds_its_default():
    """The table names real keys, and the defaults (and every shipped config) sit inside it."""
    cfg = config_from_dict(to_dict(ExperimentConfig()))  # validates, ranges included
    for key in RANGES:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)  # AttributeError: the table names a key that does not exist
    shipped = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
    assert len(shipped) >= 4
    for path in shipped:
        load_config(path)


def test_echoed_values_are_cut_short(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "name: x\n"), ["train.steps=" + "x" * 100_000])
    assert "train.steps: expected an integer, got str 'xxxx" in str(e.value) and len(str(e.value)) < 200
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "name: x\n"), ["tasks=[" + ",".join(["[1, [2, [3, [4]]]]"] * 5000) + "]"])
    assert len(str(e.value)) < 300


def test_a_checkpoint_never_sets_the_user_only_keys():
    stored = to_dict(ExperimentConfig(plugins=("evil",), source="/their/exp.yaml"))
    stored["data"]["root"], stored["train"]["ds_config"] = "/their/data", "/their/ds.json"
    stored["data"]["media_roots"] = ["/"]  # would let their data's paths lead anywhere
    cfg = config_from_dict(from_checkpoint(stored))
    assert cfg.plugins == () and cfg.source is None and cfg.data.root is None and cfg.train.ds_config is None
    assert cfg.data.media_roots == ()
    assert stored["plugins"] == ["evil"]  # the stored copy is left as it was
    assert set(USER_ONLY_KEYS) == {"plugins", "source", "data.root", "data.media_roots", "train.ds_config"}


def test_a_checkpoint_without_the_shared_expert_key_is_the_same_model():
    from pathways_mm.config import MoEConfig, model_differences

    model = ModelConfig(moe=MoEConfig(num_experts=4, mi_coef=0.05))
    stored = to_dict(model)
    del stored["moe"]["shared_d_ff"]  # written before shared experts existed
    assert model_differences(stored, model) == []
    shared = dataclasses.replace(model, moe=dataclasses.replace(model.moe, shared_d_ff=32))
    assert model_differences(stored, shared) == ["model.moe.shared_d_ff"]  # a shared expert changes the model
    reweighted = dataclasses.replace(model, moe=dataclasses.replace(model.moe, mi_coef=0.005, balance_coef=0.0))
    assert model_differences(stored, reweighted) == []  # objective weights are runtime keys
    with pytest.raises(ConfigError, match="model.moe.shared_d_ff"):
        config_from_dict({"model": {"moe": {"num_experts": 4, "shared_d_ff": -1}}})
