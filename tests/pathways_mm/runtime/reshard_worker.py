"""One process redoes steps that a run of WORLD processes took after resuming, from the same checkpoint.

    python -m tests.pathways_mm.runtime.reshard_worker CONFIG START_TAG END_TAG WORLD [--set k=v ...]

Loads START_TAG (weights, LR schedule, Adam moments: resharded to one process), then for every
step up to END_TAG's computes the micro-batches of ranks 0..WORLD-1 with gradient accumulation
over WORLD (data parallelism's mean of gradients). Prints one JSON line: the loss of every step,
and the largest relative difference of the weights and of each Adam moment from END_TAG's, read
back through the same names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from pathways_mm.config import load_config
from pathways_mm.data.taskset import load_tasks, make_sampler, train_batch
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.model.model import build_model
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime import engine as ds_engine
from pathways_mm.runtime import reshard
from pathways_mm.training.losses import forward_loss


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("start", type=Path)
    p.add_argument("end", type=Path)
    p.add_argument("world", type=int)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(args.config, [*args.overrides, "model.moe.ep_size=1", f"train.grad_accum={args.world}"])
    ds_engine.init_distributed(1)
    tok = load_tokenizer()
    ts = load_tasks(cfg)
    torch.manual_seed(cfg.seed)
    engine = ds_engine.initialize(build_model(cfg.model, tok.vocab_size), cfg, 1)
    start_meta, end_meta = ckpt.read_meta(args.start), ckpt.read_meta(args.end)
    reshard.resume(engine, args.start, start_meta, 1)
    # the batches of `world` ranks with one micro-step each, as the run that saved `end` drew them
    sampler = make_sampler(cfg.replace(train=dataclasses.replace(cfg.train, grad_accum=1)), ts, world=args.world)
    engine.train()
    losses = {}
    for step in range(start_meta["step"], end_meta["step"]):
        lm = []
        for rank in range(args.world):
            out = forward_loss(engine, train_batch(cfg, ts, sampler, tok, step, 0, rank).to(ds_engine.device()))
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer at the WORLD-th micro-step only
            lm.append(out.lm_loss.item())
        losses[step + 1] = sum(lm) / len(lm)
    weights = ckpt.load_full_state(args.end)
    mine = engine.module.state_dict()
    moments, _ = reshard.saved_state(args.end, end_meta["layout"], str(args.end))
    by_id = {id(p): n for n, p in engine.module.named_parameters()}
    diffs = {"weights": max(rel(mine[k], v) for k, v in weights.items() if torch.is_floating_point(v))}
    expert_moments = 0
    for p, s in engine.optimizer.state.items():
        saved = moments[by_id[id(p)]]
        for k in ("exp_avg", "exp_avg_sq"):
            diffs[k] = max(diffs.get(k, 0.0), rel(s[k], saved[k]))
        expert_moments += ".experts." in by_id[id(p)]
    print(json.dumps({"losses": losses, "diffs": diffs, "expert_moments": expert_moments, "moments": len(moments)}))
    ds_engine.shutdown()


if __name__ == "__main__":
    main()
