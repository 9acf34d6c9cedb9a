"""Experiment configuration: one frozen dataclass per component, nested in `ExperimentConfig`.

A YAML file holds only what differs from the defaults. `load_config` refuses unknown keys
(naming the key path and the closest valid key) and values of the wrong type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathways_mm.errors import ConfigError, clip, shorten
from pathways_mm.io import existing, load_yaml
from pathways_mm.metrics import METRICS
from pathways_mm.tasks.base import MODALITIES


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Sparse feed-forward layers. `num_experts: 0` keeps every FFN dense."""

    num_experts: int = 0
    top_k: int = 2
    expert_d_ff: int | None = None  # hidden size of each expert; null = model.d_ff
    # Hidden size of a shared expert: a dense SwiGLU beside the routed experts that every token
    # passes through (DeepSeekMoE); trunk like attention, never masked or cut by an export. 0 = none.
    shared_d_ff: int = 0
    moe_every: int = 2
    capacity_factor: float | None = None  # null = dropless
    eval_capacity_factor: float | None = None  # null = same as capacity_factor
    impl: str = "grouped"  # "grouped" (dropless, grouped GEMM) or "deepspeed"
    ep_size: int = 1
    # Load balance: "per_task" spreads every task over all experts (a Switch loss per task, averaged),
    # which works against task-specific pathways; "global" balances the experts over all tokens
    # and lets each task concentrate (pair it with mi_coef).
    balance: str = "per_task"
    balance_coef: float = 0.01
    # Mod-Squad's mutual-information loss, -I(task; expert) of each batch's router probabilities:
    # balanced experts overall, few experts per task. 0 = off.
    mi_coef: float = 0.0
    # False: plain token routing, the learned per-task prior left out of the router's logits.
    task_prior: bool = True
    z_loss_coef: float = 0.001
    router_jitter: float = 0.0
    debug_route_to: int | None = None  # _debug_: send every token to this expert (tests)
    # Blocks of experts in the order they joined, owner -> count ("base" = the first pool; then
    # one block per task that `add-task --grow-experts` gave its own experts). Empty = one block.
    # The router scores each block with its own matmul, so growing a layer leaves the old
    # experts' logits bit-identical.
    expert_groups: dict[str, int] = field(default_factory=dict)
    # Hard pathways late in training: over the `mask_window` training forwards (micro-batches)
    # that end with forward `mask_step`, count each task's routes, then allow each task only the
    # fewest experts that carried `mask_mass` of them (at least top_k, at most mask_max_experts;
    # null = num_experts // 2). The forwards after mask_step train inside the masks, and an
    # exported task keeps only its allowed experts. mask_mass 0 = off.
    mask_mass: float = 0.0
    mask_step: int = 0
    mask_window: int = 100
    mask_max_experts: int | None = None
    # > 0: choose the masks with the load in view: no expert gets more than this many times its
    # fair share of the tallied routes (tasks choose in turn, skipping full experts). 0 = off.
    mask_load_cap: float = 0.0


# How a layer runs or trains, not what a trained layer computes: a checkpoint loads whatever
# these are set to (`model_differences` ignores them).
MOE_RUNTIME_KEYS = (
    "impl",
    "capacity_factor",
    "eval_capacity_factor",
    "ep_size",
    "debug_route_to",
    "router_jitter",
    "balance",
    "balance_coef",
    "mi_coef",
    "z_loss_coef",
    "mask_step",
    "mask_window",
    "mask_max_experts",
    "mask_load_cap",
)


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Image encoder: resize to `image_size` rows (width keeps the aspect), conv stem, patches."""

    image_size: int = 16  # rows after resizing; a strip of k digits is k * image_size wide
    patch_size: int = 4
    stem_channels: int = 32
    max_patches_per_row: int = 32  # widest strip: max_patches_per_row * patch_size pixels
    # training augmentation (random affine per image); evaluation uses none
    max_rotate: float = 12.0  # degrees
    max_translate: float = 0.1  # fraction of the size
    max_scale: float = 0.1  # zoom in [1 - s, 1 + s]


@dataclass(frozen=True, kw_only=True)
class AudioConfig:
    """Audio encoder: log-mel spectrogram, SpecAugment in training, 4x conv subsampling."""

    sample_rate: int = 16_000  # files and predict inputs are resampled to it; a task's own clips must match it
    n_fft: int = 512
    hop_length: int = 256  # 16 ms frames
    n_mels: int = 40
    max_seconds: float = 4.0
    # SpecAugment in training: one frequency and one time mask per clip, width up to these
    freq_mask: int = 8  # mel bins
    time_mask: int = 10  # frames


# Named sizes. `debug` trains in seconds on a CPU; `1b` is for GPUs (with MoE every second
# layer and 16 experts it holds about a billion parameters).
SIZES: dict[str, dict[str, int]] = {
    "debug": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=192),
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
    "small": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=2, d_ff=768),
    "base": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1536),
    "1b": dict(d_model=1536, n_layers=16, n_heads=16, n_kv_heads=4, d_ff=4096),
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Decoder sizes. `size` names a row of SIZES; a dimension given beside it overrides that row.

    The size is applied here, not by the YAML loader, so `ModelConfig(size="tiny")` in Python and
    `model: {size: tiny}` in a config give the same model.
    """

    size: str = "debug"
    d_model: int | None = None  # None: from SIZES[size], as are the four below
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    d_ff: int | None = None
    max_seq_len: int = 256
    max_tasks: int = 32
    prefix_lm: bool = True
    rope_theta: float = 10000.0
    init_std: float = 0.02
    norm_eps: float = 1e-5
    # Task adapters (added by `add-task --adapter-rank R`): low-rank updates of every block's
    # attention projections and of its output, each owned by one task (ids listed here) and
    # applied only to that task's sequences; other tasks' outputs stay bit-identical.
    adapter_rank: int = 0
    adapter_tasks: tuple[int, ...] = ()
    moe: MoEConfig = field(default_factory=MoEConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.size, str) or self.size not in SIZES:
            close = difflib.get_close_matches(str(self.size), SIZES, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"model.size: unknown model size {shorten(self.size)}; {hint}choose one of {', '.join(SIZES)}"
            )
        for key, value in SIZES[self.size].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)  # frozen: filled in once, at construction

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True, kw_only=True)
class MixtureConfig:
    """Multi-task sampling: task t is drawn with probability proportional to size_t ** (1/T)."""

    temperature: float = 2.0
    weights: dict[str, float] = field(default_factory=dict)  # optional manual multipliers


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    root: str | None = None  # dataset cache; default $PMM_DATA or ~/.cache/pathways_mm
    seed: int = 1234
    max_len: int = 128  # longest sequence (task token + prompt + target) fed to the model
    # Input pipeline: background processes that read, decode and collate the next batches
    # (a torch DataLoader); 0 = in the training process, between steps.
    num_workers: int = 0
    prefetch_factor: int = 2  # micro-batches each worker prepares ahead
    pin_memory: bool = True  # page-locked batches for a faster copy to the GPU (ignored on a CPU)
    # A sample that cannot be read or decoded: "error" stops the run naming the file; "skip"
    # drops it from its batch, counts it in metrics.jsonl, and saves and stops the run once more
    # than max_bad_fraction of the samples read were bad, judged when enough were read to tell
    # (training/bad_samples.py).
    on_bad_sample: str = "error"
    max_bad_fraction: float = 0.01
    # Declared tasks' media (docs/failure.md). A path in the data must resolve, symlinks followed,
    # inside its manifest's (or dataset's, or shards') folder or one of these folders (relative to
    # the experiment file; only the user's config sets them, never a checkpoint); else it is a bad
    # sample, refused before any byte of it is read.
    media_roots: tuple[str, ...] = ()
    # Larger media are bad samples, refused from the file's size or header before decoding (a clip
    # longer than model.audio.max_seconds too). Bytes: a media file, shard member or manifest row,
    # and an audio clip's decoded float32 samples.
    max_media_bytes: int = 64 << 20
    max_image_pixels: int = 1 << 25  # width x height: 8192 x 4096, a 33-megapixel photo
    max_audio_channels: int = 16


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """Where one split of a declared task comes from (docs: README "Training on your own data").

    format: jsonl | csv (a manifest; media fields hold paths relative to it), webdataset (.tar
    shards, brace patterns allowed, fields are member extensions), hf (a `save_to_disk` folder)
    or parquet (files of a Hugging Face dataset); null = from the path's suffix.
    """

    path: str = ""  # relative paths are relative to the experiment file
    format: str | None = None
    split: str | None = None  # hf: which split of a DatasetDict folder (default: the split's own name)


@dataclass(frozen=True, kw_only=True)
class DeclaredTaskConfig:
    """A task made from data, without Python: fields -> modality segments -> the target text."""

    inputs: dict[str, str] = field(default_factory=dict)  # field -> modality (text/image/audio), in order
    prompt: str = ""  # text after the inputs, before the answer
    target: str = ""  # the field holding the answer text
    metrics: tuple[str, ...] = ("exact_match",)
    max_new_tokens: int = 16  # longest generated answer in evaluation
    description: str = ""
    splits: dict[str, SourceConfig] = field(default_factory=dict)  # split name (train, test, ...) -> source


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    # "example": every sample weighs the same, whatever its target length, so the mixture alone
    # sets a task's weight (a 3-token answer is not drowned by 90-token LM chunks); "token": T5-style;
    # "sqrt": a sample weighs sqrt(its target tokens), between the two.
    loss_norm: str = "example"
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 3
    out_dir: str = "runs/default"
    ds_config: str | None = None  # DeepSpeed JSON, relative to the experiment file; null = the built-in settings
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    # Longest wait in any collective once training starts: a rank that stops answering fails the run after this long
    # (plus as long again to learn which rank it was) instead of hanging it.
    collective_timeout_s: float = 300.0
    max_bad_steps: int = 5  # non-finite loss/gradient steps in a row (each skipped) before the run stops
    # Where records go: metrics.jsonl always (studies read it), metrics.csv, TensorBoard (RUN/tensorboard/).
    log_to: tuple[str, ...] = ("jsonl",)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    split: str = "test"
    max_samples: int = 200  # per task
    batch_size: int = 32
    routes: bool = False  # also write a routes file (docs/routes.md) at each evaluation, into out_dir/routes/


@dataclass(frozen=True, kw_only=True)
class ContinualConfig:
    """`pathways-mm continual`: train `tasks`, then add these one at a time (docs/continual.md)."""

    add: tuple[str, ...] = ()
    steps: int = 300  # training steps for each added task, in each of the three ways of adding it
    grow_experts: int = 0  # experts per MoE layer that add-task gives each new task
    adapter_rank: int = 16  # add-task's --adapter-rank for each new task
    add_lr: float | None = None  # add-task's learning rate (only the new parts train); None: train.lr


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    tasks: tuple[str, ...] = ("text_lm", "text_arith")
    plugins: tuple[str, ...] = ()
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    declare: dict[str, DeclaredTaskConfig] = field(default_factory=dict)  # tasks made from data files
    source: str | None = None  # where the config was read from; set by load_config

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)


def to_dict(obj: Any) -> Any:
    """A config as plain YAML/JSON data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {shorten(value)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} keys, got {shorten(value)}")
        return _build(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {shorten(value)}")
        item_tp = args[0]
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {shorten(value)}")
        ktp, vtp = args
        return {_coerce(k, ktp, f"{path}.{k}"): _coerce(v, vtp, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {shorten(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {shorten(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {shorten(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {type(value).__name__} {shorten(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {shorten(value)}")
        return value
    if tp is Any:
        return value
    raise AssertionError(f"unsupported config annotation {tp!r} at {path}")


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            full = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {shorten(full)}{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["train.steps=10", "tasks=[text_lm]"]` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} (for example --set train.steps=100)")
        key, raw = item.split("=", 1)
        value = load_yaml(raw, f"--set {clip(key, 80)}") if raw != "" else ""
        _set_dotted(out, key.strip(), value)
    return out


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


# Keys only the user sets (their config, --set, the environment), never a checkpoint: which code
# runs (plugins) and where this machine keeps things (the data root, the DeepSpeed JSON and the
# folder relative paths start from). A checkpoint from elsewhere names paths and modules of the
# machine it was trained on; `from_checkpoint` drops them, so the defaults or the user's apply.
USER_ONLY_KEYS = ("plugins", "source", "data.root", "data.media_roots", "train.ds_config")


def from_checkpoint(stored: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's stored config without USER_ONLY_KEYS."""
    out = dict(stored)
    for key in USER_ONLY_KEYS:
        *parents, last = key.split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                break
            node[part] = node = dict(node[part])
        else:
            node.pop(last, None)
    return out


def config_from_dict(data: dict[str, Any], source: str | None = None) -> ExperimentConfig:
    data = dict(data)
    data.pop("source", None)
    cfg = _build(ExperimentConfig, data, "")
    cfg = dataclasses.replace(cfg, source=source)
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike, overrides: Sequence[str] | dict[str, Any] = ()) -> ExperimentConfig:
    """Read an experiment YAML file, apply `--set key=value` overrides (strings, or already parsed
    into a nested dict), check every key and type."""
    p = existing(path, "config file", "give the path of an experiment YAML, e.g. configs/experiments/demo.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not valid YAML: not UTF-8 text ({e.reason} at byte {e.start})") from None
    data = load_yaml(text, str(p))
    if data is None or data == {}:
        raise ConfigError(
            f"{p}: empty config; an experiment YAML holds what differs from the defaults, at least its tasks "
            "(e.g. `tasks: [text_lm, text_arith]`; see configs/experiments/)"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    # a declared source is relative to the file that names it (--set paths: to the working directory)
    data = merge_dicts(_absolute_paths(data, p.resolve().parent), _absolute_paths(extra, Path.cwd()))
    return config_from_dict(data, source=str(p.resolve()))


def _absolute_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """`data` with each `declare.TASK.splits.SPLIT.path` and `data.media_roots` entry made absolute
    against `base` (malformed entries are left for the type checks to report)."""
    section = data.get("data")
    if isinstance(section, dict) and isinstance(section.get("media_roots"), list):
        roots = [str(base / Path(r).expanduser()) if isinstance(r, str) and r else r for r in section["media_roots"]]
        data = {**data, "data": {**section, "media_roots": roots}}
    declare = data.get("declare")
    if not isinstance(declare, dict):
        return data
    out = {}
    for name, spec in declare.items():
        splits = spec.get("splits") if isinstance(spec, dict) else None
        if isinstance(splits, dict):
            splits = {
                k: {**v, "path": str(base / Path(v["path"]).expanduser())}
                if isinstance(v, dict) and isinstance(v.get("path"), str) and v["path"]
                else v
                for k, v in splits.items()
            }
            spec = {**spec, "splits": splits}
        out[name] = spec
    return {**data, "declare": out}


# The one table of numeric ranges, checked before any work starts: a value past it would crash
# later (a 1e10-position RoPE table, a 1e11-row batch, a negative seed deep inside numpy) or
# means nothing. Command-line counts (--max-samples, --stop-after, --steps, ...) are checked
# against the key they stand for (`check_range`). Lowest and highest allowed, inclusive.
_MANY = 10**9
RANGES: dict[str, tuple[float, float]] = {
    "seed": (0, 2**63 - 1),
    "data.seed": (0, 2**63 - 1),
    "data.max_len": (2, 65_536),
    "data.num_workers": (0, 1024),
    "data.prefetch_factor": (1, 1024),
    "data.max_bad_fraction": (0, 1),
    "data.max_media_bytes": (1, 1 << 40),
    # Pillow refuses images past twice its own MAX_IMAGE_PIXELS (DecompressionBombError) whatever we allow
    "data.max_image_pixels": (1, 178_956_970),
    "data.max_audio_channels": (1, 1024),
    "model.d_model": (1, 65_536),
    "model.n_layers": (1, 1024),
    "model.n_heads": (1, 1024),
    "model.n_kv_heads": (1, 1024),
    "model.d_ff": (1, 1 << 20),
    "model.max_seq_len": (1, 65_536),
    "model.max_tasks": (1, 4096),
    "model.adapter_rank": (0, 4096),
    "model.rope_theta": (0, 1e12),
    "model.init_std": (0, 10),
    "model.norm_eps": (0, 1),
    "model.moe.num_experts": (0, 4096),
    "model.moe.top_k": (1, 4096),
    "model.moe.expert_d_ff": (1, 1 << 20),
    "model.moe.shared_d_ff": (0, 1 << 20),
    "model.moe.moe_every": (1, 1024),
    "model.moe.ep_size": (1, 4096),
    "model.moe.capacity_factor": (0, 1e4),
    "model.moe.eval_capacity_factor": (0, 1e4),
    "model.moe.balance_coef": (0, 1e3),
    "model.moe.z_loss_coef": (0, 1e3),
    "model.moe.mi_coef": (0, 1e3),
    "model.moe.mask_mass": (0, 1),
    "model.moe.mask_step": (0, _MANY),
    "model.moe.mask_window": (1, _MANY),
    "model.moe.mask_max_experts": (1, 4096),
    "model.moe.mask_load_cap": (0, 4096),
    "model.moe.router_jitter": (0, 1),
    "model.vision.image_size": (1, 4096),
    "model.vision.patch_size": (1, 4096),
    "model.vision.stem_channels": (1, 4096),
    "model.vision.max_patches_per_row": (1, 4096),
    "model.vision.max_rotate": (0, 180),
    "model.vision.max_translate": (0, 1),
    "model.vision.max_scale": (0, 0.99),
    "model.audio.sample_rate": (1, 384_000),
    "model.audio.n_fft": (1, 65_536),
    "model.audio.hop_length": (1, 65_536),
    "model.audio.n_mels": (1, 1024),
    "model.audio.max_seconds": (0, 3600),
    "model.audio.freq_mask": (0, 1024),
    "model.audio.time_mask": (0, 65_536),
    "mixture.temperature": (0, 1e6),
    "train.steps": (1, _MANY),
    "train.micro_batch_size": (1, 65_536),
    "train.grad_accum": (1, 65_536),
    "train.lr": (0, 10),
    "train.min_lr_ratio": (0, 1),
    "train.warmup_steps": (0, _MANY),
    "train.weight_decay": (0, 10),
    "train.log_every": (1, _MANY),
    "train.eval_every": (0, _MANY),
    "train.save_every": (0, _MANY),
    "train.keep_checkpoints": (0, 1_000_000),
    "train.threads": (0, 4096),
    "train.collective_timeout_s": (0, 7 * 86_400),
    "train.max_bad_steps": (1, 1_000_000),
    "eval.max_samples": (0, _MANY),
    "eval.batch_size": (1, 65_536),
    "continual.steps": (1, _MANY),
    "continual.grow_experts": (0, 4096),
    "continual.adapter_rank": (0, 4096),
    "continual.add_lr": (0, 10),
}
# Of these, the floats that must be above their lowest value, not equal to it.
ABOVE_LOWEST = (
    "model.rope_theta",
    "model.init_std",
    "model.norm_eps",
    "model.moe.capacity_factor",
    "model.moe.eval_capacity_factor",
    "model.audio.max_seconds",
    "mixture.temperature",
    "train.lr",
    "continual.add_lr",
    "train.collective_timeout_s",
)


def check_range(key: str, value: float | None, name: str | None = None) -> None:
    """`value` of `key` (a RANGES key) within its range, else a ConfigError naming `name` (the
    flag that set it, e.g. --max-samples) or the key. None (unset) passes."""
    if value is None:
        return
    lo, hi = RANGES[key]
    above = key in ABOVE_LOWEST
    if (value <= lo if above else value < lo) or value > hi:
        want = f"> {lo} and <= {hi}" if above else f"between {lo} and {hi}"
        raise ConfigError(f"{name or key} must be {want}, got {shorten(value)}")


def _validate_ranges(cfg: ExperimentConfig) -> None:
    for key in RANGES:
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        check_range(key, node)


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks that a type check cannot make."""
    _validate_ranges(cfg)
    _validate_model(cfg.model)
    _validate_moe(cfg.model.moe)
    _validate_tasks(cfg)
    _validate_train(cfg)
    _validate_data(cfg)


def _validate_model(m: ModelConfig) -> None:
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    if m.head_dim % 2:
        raise ConfigError(f"model head_dim = d_model / n_heads = {m.head_dim} must be even for RoPE")
    if (m.adapter_rank > 0) != bool(m.adapter_tasks):
        raise ConfigError(
            "model.adapter_rank and model.adapter_tasks go together (add-task sets both); leave both unset"
        )
    if any(not 0 <= t < m.max_tasks for t in m.adapter_tasks) or len(set(m.adapter_tasks)) != len(m.adapter_tasks):
        raise ConfigError(f"model.adapter_tasks {list(m.adapter_tasks)}: distinct task ids below model.max_tasks")
    v = m.vision
    if v.image_size % v.patch_size:
        raise ConfigError(
            f"model.vision.image_size ({v.image_size}) must be a positive multiple of "
            f"model.vision.patch_size ({v.patch_size})"
        )
    a = m.audio
    if a.n_fft < a.hop_length:
        raise ConfigError(f"model.audio.n_fft ({a.n_fft}) must be >= model.audio.hop_length ({a.hop_length})")


def _validate_moe(e: MoEConfig) -> None:
    if not e.num_experts:
        return
    if e.impl not in ("grouped", "deepspeed"):
        raise ConfigError(f"model.moe.impl: {shorten(e.impl)} is not 'grouped' or 'deepspeed'")
    if not 1 <= e.top_k <= e.num_experts:
        raise ConfigError(f"model.moe.top_k ({e.top_k}) must be between 1 and num_experts ({e.num_experts})")
    if e.num_experts % e.ep_size:
        raise ConfigError(
            f"model.moe.num_experts ({e.num_experts}) must be divisible by model.moe.ep_size ({e.ep_size})"
        )
    if e.balance not in ("per_task", "global"):
        raise ConfigError(f"model.moe.balance: {shorten(e.balance)} is not 'per_task' or 'global'")
    _validate_masks(e)
    if e.expert_groups and (sum(e.expert_groups.values()) != e.num_experts or min(e.expert_groups.values()) < 1):
        raise ConfigError(
            f"model.moe.expert_groups {e.expert_groups} must be positive counts summing to num_experts "
            f"({e.num_experts}); leave it empty for one block"
        )


def _validate_masks(e: MoEConfig) -> None:
    if not 0 <= e.mask_mass <= 1:
        raise ConfigError(f"model.moe.mask_mass must be within [0, 1] (0 = off), got {e.mask_mass}")
    if e.mask_mass == 0:
        return
    if not 1 <= e.mask_window <= e.mask_step:
        raise ConfigError(
            f"model.moe.mask_window ({e.mask_window}) must be between 1 and model.moe.mask_step ({e.mask_step}): "
            "the training forwards whose routes decide each task's experts"
        )
    most = e.num_experts // 2 if e.mask_max_experts is None else e.mask_max_experts
    if not e.top_k <= most <= e.num_experts:
        raise ConfigError(
            f"model.moe.mask_max_experts ({most}) must be between top_k ({e.top_k}) and num_experts ({e.num_experts})"
        )


def _validate_tasks(cfg: ExperimentConfig) -> None:
    if not cfg.tasks:
        raise ConfigError("tasks: list at least one task (see `pathways-mm tasks`)")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise ConfigError(f"tasks: a task is listed twice in {shorten(list(cfg.tasks))}")
    if len(cfg.tasks) > cfg.model.max_tasks:
        raise ConfigError(f"tasks: {len(cfg.tasks)} tasks but model.max_tasks is {cfg.model.max_tasks}")
    for name, weight in cfg.mixture.weights.items():
        if name not in cfg.tasks:
            raise ConfigError(
                f"mixture.weights.{clip(name, 80)}: not one of the configured tasks {shorten(list(cfg.tasks))}"
            )
        if weight < 0:
            raise ConfigError(f"mixture.weights.{clip(name, 80)}: a task weight must be >= 0")
    c = cfg.continual
    if set(c.add) & set(cfg.tasks) or len(set(c.add)) != len(c.add):
        raise ConfigError(
            f"continual.add {shorten(list(c.add))}: list each task once, none of the first group {shorten(list(cfg.tasks))}"
        )


def _validate_train(cfg: ExperimentConfig) -> None:
    t = cfg.train
    if t.loss_norm not in ("example", "token", "sqrt"):
        raise ConfigError(f"train.loss_norm: {shorten(t.loss_norm)} is not 'example', 'token' or 'sqrt'")
    sinks = {"jsonl", "tensorboard", "csv"}
    if "jsonl" not in t.log_to or not set(t.log_to) <= sinks or len(set(t.log_to)) < len(t.log_to):
        raise ConfigError(
            f"train.log_to: {shorten(list(t.log_to))}; list jsonl (always written: studies read it) and "
            "optionally tensorboard and csv, each once"
        )
    if cfg.data.max_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.max_len ({cfg.data.max_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    if cfg.eval.routes and not cfg.model.moe.num_experts:
        raise ConfigError(
            "eval.routes: a dense model has no routes; set model.moe.num_experts > 0 or eval.routes: false"
        )


SOURCE_FORMATS = ("jsonl", "csv", "webdataset", "hf", "parquet")


def _validate_data(cfg: ExperimentConfig) -> None:
    d = cfg.data
    if d.on_bad_sample not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_sample: {shorten(d.on_bad_sample)} is not 'error' or 'skip'")
    if not 0 <= d.max_bad_fraction < 1:
        raise ConfigError(f"data.max_bad_fraction must be within [0, 1), got {d.max_bad_fraction}")
    if not all(d.media_roots):
        raise ConfigError("data.media_roots: name folders (an empty entry would mean the working directory)")
    for name, spec in cfg.declare.items():
        where = f"declare.{name}"
        if not name.isidentifier():
            raise ConfigError(f"{where}: a task name must be identifier-like (letters, digits, _)")
        if not spec.inputs and not spec.prompt:
            raise ConfigError(f"{where}.inputs: map at least one field to a modality (e.g. {{image: image}})")
        bad = {f: m for f, m in spec.inputs.items() if m not in MODALITIES}
        if bad:
            raise ConfigError(f"{where}.inputs: unknown modalities {bad}; choose from {list(MODALITIES)}")
        if not spec.target:
            raise ConfigError(f"{where}.target: name the field that holds the answer text")
        bad_metrics = [m for m in spec.metrics if m not in METRICS]
        if not spec.metrics or bad_metrics:
            raise ConfigError(f"{where}.metrics: {list(spec.metrics)}; choose from {list(METRICS)}")
        if spec.max_new_tokens < 1:
            raise ConfigError(f"{where}.max_new_tokens must be >= 1")
        if "train" not in spec.splits:
            raise ConfigError(f"{where}.splits: give at least a train source, e.g. train: {{path: train.jsonl}}")
        for split, src in spec.splits.items():
            if not src.path:
                raise ConfigError(f"{where}.splits.{split}.path: the file, folder or shard pattern to read")
            if src.format is not None and src.format not in SOURCE_FORMATS:
                raise ConfigError(f"{where}.splits.{split}.format: {src.format!r}; choose from {list(SOURCE_FORMATS)}")


def model_differences(stored: dict[str, Any], model: ModelConfig) -> list[str]:
    """The keys in which a stored model config (a checkpoint's) and `model` compute different things.

    The one rule for "same model" (resume, eval, export, add-task): every model key must match
    except how MoE layers run or train (RUNTIME_KEYS), since weights are stored per expert. A key
    the stored config lacks (an older pathways-mm) holds its default there.
    """
    new = to_dict(model)
    old = {**to_dict(ModelConfig(size=new["size"])), **stored}
    old_moe = {**to_dict(MoEConfig()), **(stored.get("moe") if isinstance(stored.get("moe"), dict) else {})}
    diff = [f"model.{k}" for k in new if k != "moe" and old.get(k) != new[k]]
    diff += [f"model.moe.{k}" for k in new["moe"] if k not in MOE_RUNTIME_KEYS and old_moe.get(k) != new["moe"][k]]
    return sorted(diff)


def one_process(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with every expert in this process (moe.ep_size 1): how a one-process tool loads any checkpoint."""
    moe = dataclasses.replace(cfg.model.moe, ep_size=1)
    return cfg.replace(model=dataclasses.replace(cfg.model, moe=moe))


def resolve_relative(cfg: ExperimentConfig, path: str) -> Path:
    """Paths inside a config are relative to the experiment file's folder (else to the cwd)."""
    p = Path(path)
    if p.is_absolute():
        return p
    if cfg.source:
        cand = Path(cfg.source).parent / p
        if cand.exists():
            return cand.resolve()
    return p.resolve()


def data_root(cfg: ExperimentConfig | None = None) -> Path:
    if cfg is not None and cfg.data.root:
        return Path(cfg.data.root).expanduser()
    return Path(os.environ.get("PMM_DATA", "~/.cache/pathways_mm")).expanduser()
