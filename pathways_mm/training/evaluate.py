"""Evaluation: per-task metrics on a held-out split, sharded over ranks, gathered on rank 0.

pathways-mm eval CKPT [--split test] [--max-samples N] [--out FILE.json] [--routes ROUTES.json]

Shape suffixes: B rows of an evaluation batch.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pathways_mm import dist, routes_file
from pathways_mm.config import ExperimentConfig, check_range, data_root, one_process
from pathways_mm.data.collate import collate, prompt_only
from pathways_mm.data.datasets import encode, load_split
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text, existing, load_json, output_file
from pathways_mm.metrics import EvalRow, format_table, score
from pathways_mm.model.generate import greedy_generate
from pathways_mm.model.model import build_model
from pathways_mm.routing import telemetry
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime import engine as ds_engine
from pathways_mm.tasks import Task, ensure_loaded
from pathways_mm.training import routes
from pathways_mm.training.losses import forward_loss


def _shard(items: list[Any], rank: int, world: int) -> tuple[list[Any], int]:
    """Every rank gets the same number of items (the last ones repeat) so collectives line up.

    Returns the items and how many of them are this rank's own (the rest are repeats).
    """
    per = math.ceil(len(items) / world)
    mine = items[rank * per : (rank + 1) * per]
    return (mine + [items[-1]] * (per - len(mine)) if mine else [items[-1]] * per), len(mine)


def _task_rows(
    model, task: Task, tid: int, samples: list[Any], cfg: ExperimentConfig, tok: TextTokenizer, split: str
) -> list[EvalRow]:
    """One EvalRow per sample of this rank's shard."""
    rank, world = dist.rank_world()
    mine, num_real = _shard(list(enumerate(samples)), rank, world)
    dev = ds_engine.device()
    need_gen = any(m in task.metrics for m in ("exact_match", "char_error_rate"))
    rows = []
    bs = cfg.eval.batch_size
    for start in range(0, len(mine), bs):
        chunk = mine[start : start + bs]
        examples = [encode(task, s) for _, s in chunk]
        keys = [f"{split}[{idx}]" for idx, _ in chunk]
        batch = collate(examples, [tid] * len(chunk), tok, cfg.data.max_len, model_cfg=cfg.model, keys=keys).to(dev)
        prompts = prompt_only(batch, tok.pad_id) if need_gen else None
        batch.modality_ids[max(0, num_real - start) :] = -1  # route telemetry counts each sample once, on one rank
        out = forward_loss(model, batch)
        gen = [None] * len(chunk)
        if need_gen:
            with telemetry.paused(model):  # decoding re-reads the prefix each step: count it once, above
                ids = greedy_generate(model, prompts, task.generation.max_new_tokens, tok.eos_id, tok.pad_id)
            gen = [tok.decode(x) for x in ids]
        for j, (idx, sample) in enumerate(chunk):
            rows.append(
                EvalRow(
                    idx,
                    out.nll_B[j].item(),
                    out.num_tokens_B[j].item(),
                    batch.target_bytes[j].item(),
                    gen[j],
                    examples[j].target_text,
                    task.group(sample),
                )
            )
    return rows


def evaluate(
    model,
    cfg: ExperimentConfig,
    tasks: Sequence[Task],
    tok: TextTokenizer,
    split: str | None = None,
    max_samples: int | None = None,
    train_sets: Sequence[Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Metrics per task (and chance levels) on `split`; every rank must call it.

    `train_sets` (one per task) feed the chance levels; read from the cache when not given.
    """
    split = split or cfg.eval.split
    limit = cfg.eval.max_samples if max_samples is None else max_samples
    root = data_root(cfg)
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    for tid, task in enumerate(tasks):
        samples = load_split(task, split, root, cfg.data.seed)
        train = train_sets[tid] if train_sets is not None else load_split(task, "train", root, cfg.data.seed)
        samples = samples[:limit] if limit else samples
        with torch.no_grad():
            rows = _task_rows(model, task, tid, samples, cfg, tok, split)
        by_index = {r.index: r for part in dist.gather(rows) for r in part}  # repeats from shard padding collapse
        res = score([by_index[i] for i in sorted(by_index)], task.metrics, task.final_answer)
        res["chance"] = {m: task.chance(m, train, samples) for m in task.metrics}
        results[task.name] = res
    if was_training:
        model.train()
    return results


def run_eval(
    checkpoint: str,
    split: str | None = None,
    max_samples: int | None = None,
    out: str | None = None,
    overrides: dict[str, Any] | None = None,
    routes_out: str | None = None,
) -> dict[str, Any]:
    """Load a checkpoint (any process count), evaluate its tasks, print a table and write JSON.

    overrides: the user's --set values (nested dict); routes_out: also count where the evaluated
    tokens go and write a routes file there.
    """
    check_range("eval.max_samples", max_samples, "--max-samples")
    for flag, path in (("--out", out), ("--routes", routes_out)):
        if path is not None:
            output_file(path, flag)
    tok = load_tokenizer()
    opened = ckpt.open_checkpoint(checkpoint, tok, overrides)
    tag_dir, meta, cfg = opened
    report_path = Path(out) if out else tag_dir / f"eval_{split or cfg.eval.split}.json"
    output_file(report_path, "the report (written inside the checkpoint without --out)")
    rank, world = ds_engine.init_distributed(cfg.train.threads)
    moe = cfg.model.moe
    if moe.num_experts and (moe.ep_size > world or world % moe.ep_size):
        # Experts are stored one file each, so any ep_size that fits this run can load them.
        cfg = one_process(cfg)
    ensure_loaded(cfg.plugins)  # the user's (--set plugins=[...]); a checkpoint never names them
    tasks = ckpt.checkpoint_tasks(opened)
    engine = ds_engine.initialize_for_eval(build_model(cfg.model, tok.vocab_size), cfg)
    ckpt.load_checkpoint(engine, tag_dir, with_optimizer=False)
    if routes_out:
        routes.start(engine)
    results = evaluate(engine, cfg, tasks, tok, split=split, max_samples=max_samples)
    report = {"checkpoint": str(tag_dir), "step": meta["step"], "split": split or cfg.eval.split, "tasks": results}
    if routes_out:
        ckpt_id = {
            "path": str(tag_dir.resolve()),
            "tag": tag_dir.name,
            "step": meta["step"],
            "tokenizer_hash": meta.get("tokenizer_hash"),
        }
        doc = routes_file.document(
            routes.finish(engine), cfg, [t.name for t in tasks], ckpt_id, routes.routed_data(results, report["split"])
        )
        if rank == 0:
            print(f"pathways-mm: wrote {routes_file.write(routes_out, doc)}", file=sys.stderr)
    if rank == 0:
        print(format_table(results))
        report_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(report_path, json.dumps(report, indent=2))
        print(f"pathways-mm: wrote {report_path}", file=sys.stderr)
    return report


def load_report(path: str, what: str) -> dict[str, dict[str, Any]]:
    """The per-task results of an `eval --out` report, checked: task -> {metric: number, ...}."""
    p = existing(path, what, "write it with `pathways-mm eval RUN --out FILE`")
    doc = load_json(p, "evaluation report")
    tasks = doc.get("tasks") if isinstance(doc, dict) else None
    ok = isinstance(tasks, dict) and all(
        isinstance(res, dict)
        and all(
            isinstance(v, (dict, type(None))) or (isinstance(v, (int, float)) and not isinstance(v, bool))
            for v in res.values()
        )
        for res in tasks.values()
    )
    if not ok:
        raise ConfigError(
            f"{p}: not an evaluation report (expected tasks: {{task: {{metric: number}}}}, as `eval --out` writes)"
        )
    return tasks
