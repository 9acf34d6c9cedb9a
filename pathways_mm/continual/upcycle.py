"""Sparse upcycling: a trained dense model becomes an MoE model that trains on from where it stood.

    pathways-mm upcycle --from DENSE_RUN --num-experts E --top-k K --out DIR [--moe-every N]
    pathways-mm train DIR/config.yaml --resume [--set train.steps=N]

Every `moe_every`-th FFN of the dense model becomes E experts, each a copy of that FFN
(Komatsuzaki et al. 2022; Megatron's --moe-use-upcycling); the routers and pathway priors start
fresh and every other weight is kept. Since the experts are equal and the top-k combine weights
sum to 1, the upcycled model starts as the dense model's function; the command checks that on a
few evaluation samples. Training continues as a resume would: at the dense checkpoint's step,
learning-rate schedule and step counters, with Adam's moments carried over (each expert gets
its FFN's, the routers none). DIR is a run directory: its checkpoint and the config.yaml that
continues it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from pathways_mm.config import ExperimentConfig, data_root, resolve_relative, to_dict, validate
from pathways_mm.continual import surgery
from pathways_mm.data.collate import collate
from pathways_mm.data.datasets import encode, load_split
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text
from pathways_mm.model.generate import target_logits
from pathways_mm.model.model import build_model, param_counts
from pathways_mm.routing import moe_layers
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime import engine as ds_engine
from pathways_mm.runtime import reshard
from pathways_mm.tasks import get_task

PROBES = 8  # evaluation samples per task in the same-function check


def upcycled_config(
    dense: ExperimentConfig, num_experts: int, top_k: int, moe_every: int | None, out_dir: str
) -> ExperimentConfig:
    """The dense run's config with every moe_every-th FFN an MoE layer of dense-FFN-wide experts."""
    if dense.model.moe.num_experts:
        raise ConfigError(
            f"the source is already an MoE model ({dense.model.moe.num_experts} experts); upcycle a dense run"
        )
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ConfigError(f"--num-experts {num_experts} --top-k {top_k}: need 1 <= top-k <= num-experts")
    every = dense.model.moe.moe_every if moe_every is None else moe_every
    if not 1 <= every <= dense.model.n_layers:
        raise ConfigError(f"--moe-every {every}: choose 1..{dense.model.n_layers} (the model's layers)")
    # the run's other MoE settings (balance, aux-loss weights, route masks) as its config gives them
    moe = dataclasses.replace(
        dense.model.moe, num_experts=num_experts, top_k=top_k, moe_every=every, expert_d_ff=None, expert_groups={}
    )
    train = dataclasses.replace(dense.train, out_dir=out_dir)
    cfg = dense.replace(name=f"{dense.name}-upcycled", model=dataclasses.replace(dense.model, moe=moe), train=train)
    validate(cfg)
    return cfg


def _probe_logits(model, cfg: ExperimentConfig, table: dict[str, int], tok: TextTokenizer) -> list[torch.Tensor]:
    """Teacher-forced target logits of PROBES evaluation samples of every task."""
    out = []
    for name, tid in table.items():
        task = get_task(name)
        samples = load_split(task, cfg.eval.split, data_root(cfg), cfg.data.seed)[:PROBES]
        batch = collate(
            [encode(task, s) for s in samples], [tid] * len(samples), tok, cfg.data.max_len, model_cfg=cfg.model
        )
        out.append(target_logits(model, batch))
    return out


def write_run_config(cfg: ExperimentConfig, path: Path) -> None:
    """`cfg` as the experiment YAML that continues the run (its DeepSpeed config by absolute path)."""
    data = to_dict(cfg)
    data.pop("source", None)
    if cfg.train.ds_config is not None:  # None: the built-in DeepSpeed settings, wherever the file lives
        data["train"]["ds_config"] = str(resolve_relative(cfg, cfg.train.ds_config))
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def run_upcycle(source: str, num_experts: int, top_k: int, out: str, moe_every: int | None = None) -> dict[str, Any]:
    """Upcycle a dense checkpoint into the run directory `out`; returns what happened (also printed)."""
    tok = load_tokenizer()
    tag_dir, meta, dense = ckpt.open_checkpoint(source, tok)
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} exists and is not empty; choose a new directory")
    cfg = upcycled_config(dense, num_experts, top_k, moe_every, str(out_dir))
    rank, world = ds_engine.init_distributed(cfg.train.threads)
    if world > 1:
        raise ConfigError("upcycle runs in one process: start it with `pathways-mm upcycle`, not the launcher")
    dense_engine = ds_engine.initialize(build_model(dense.model, tok.vocab_size), dense, world)
    ckpt.load_checkpoint(dense_engine, tag_dir, with_optimizer=True)
    model = build_model(cfg.model, tok.vocab_size)
    layers = [name for name, _ in moe_layers(model)]
    dense_state = {k: v.cpu() for k, v in dense_engine.module.state_dict().items()}
    state = surgery.upcycle(dense_state, model.state_dict(), layers)
    for key in [k for k in state if k.endswith(".gate.num_forwards")]:  # route masks count forwards from step 0
        state[key] = torch.tensor(meta["step"] * dense.train.grad_accum)
    ckpt.load_weights(model, state, tag_dir)
    engine = ds_engine.initialize(model, cfg, world)
    moments = _upcycled_moments(dense_engine, engine, layers)
    ds_engine.continue_schedule(dense_engine, engine)
    table = meta["task_table"]
    before, after = (_probe_logits(e, cfg, table, tok) for e in (dense_engine, engine))
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after) if a.numel())
    step = meta["step"]
    new_meta = ckpt.checkpoint_meta(cfg, table, tok, step) | {
        "layout": reshard.layout(engine, world),
        "upcycled_from": {"checkpoint": str(tag_dir), "step": step, "num_experts": num_experts, "top_k": top_k},
    }
    saved = ckpt.save_checkpoint(engine, out_dir / "checkpoints", step, new_meta, cfg.train.keep_checkpoints)
    write_run_config(cfg, out_dir / "config.yaml")
    total, active = param_counts(engine.module)
    report = {
        "source": str(tag_dir),
        "checkpoint": str(saved),
        "step": step,
        "moe_layers": layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "params_total": total,
        "params_active": active,
        "adam_moments_carried": moments,
        "max_abs_logit_diff": diff,
    }
    print(
        f"upcycled {tag_dir} (step {step}): {len(layers)} MoE layers of {num_experts} experts, top-{top_k}; "
        f"{total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active); Adam moments "
        f"{'carried over' if moments else 'fresh (not a plain fp32 ZeRO-0 optimizer)'}; "
        f"max |logit difference| from the dense model {diff:.2g} on {PROBES} samples per task\n"
        f"pathways-mm: wrote {saved}; continue with: pathways-mm train {out_dir / 'config.yaml'} --resume",
        file=sys.stderr,
    )
    return report


def _upcycled_moments(dense_engine, engine, layers: list[str]) -> bool:
    """Adam's state of each dense parameter for its upcycled ones (every expert its FFN's); the
    routers start without. False if either optimizer is not plain (then all start fresh)."""
    states = reshard.named_state(dense_engine)
    if states is None:
        return False
    new = {}
    for name, p in engine.module.named_parameters():
        src = surgery.dense_source(name, layers)
        if src is None or src not in states:
            continue
        new[name] = {k: _widen(v, p) for k, v in states[src].items()}
    return reshard.set_named_state(engine, new)


def _widen(value: Any, p: torch.Tensor) -> Any:
    """A dense parameter's optimizer value for `p`: a moment repeated over p's experts, a step as is."""
    if not torch.is_tensor(value):
        return value
    return value.expand_as(p).clone() if 0 < value.dim() < p.dim() else value.clone()
