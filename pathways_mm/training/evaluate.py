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
from pathways_mm.data.declared import declare_tasks
from pathways_mm.data.sources import Row
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text, existing, load_json, output_file
from pathways_mm.metrics import EvalRow, format_table, sample_metrics, score
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


def _read_chunk(task: Task, samples: Sequence[Any], idxs: list[int], skip: bool) -> tuple[list[tuple], list[int]]:
    """(position in the chunk, index, sample, example) of each readable sample, and the indices of
    the bad ones (data.on_bad_sample: skip; else the first bad one raises)."""
    kept, bad = [], []
    for pos, idx in enumerate(idxs):
        try:
            sample = samples[idx]
            kept.append((pos, idx, sample, encode(task, sample)))
        except ConfigError:
            if not skip:
                raise
            bad.append(idx)
    return kept, bad


def _task_rows(
    model, task: Task, tid: int, samples: Sequence[Any], cfg: ExperimentConfig, tok: TextTokenizer, split: str
) -> tuple[list[EvalRow], set[int]]:
    """One EvalRow per good sample of this rank's shard, and the indices of its bad samples."""
    rank, world = dist.rank_world()
    mine, num_real = _shard(list(range(len(samples))), rank, world)
    dev = ds_engine.device()
    need_gen = any(m in task.metrics for m in ("exact_match", "char_error_rate"))
    skip = cfg.data.on_bad_sample == "skip"
    rows, bad_idxs = [], set()
    bs = cfg.eval.batch_size
    for start in range(0, len(mine), bs):
        kept, bad = _read_chunk(task, samples, mine[start : start + bs], skip)
        dropped: list[int] = []
        keys = [s if isinstance(s, Row) else f"{split}[{idx}]" for _, idx, s, _ in kept]
        on_bad = (lambda b, e, dropped=dropped: dropped.append(b)) if skip else None
        if not kept:
            raise ConfigError(f"task '{task.name}': every sample of an evaluation batch of {split} was bad")
        examples = [ex for *_, ex in kept]
        batch = collate(
            examples, [tid] * len(kept), tok, cfg.data.max_len, model_cfg=cfg.model, keys=keys, on_bad=on_bad
        )
        bad_idxs.update(bad + [kept[b][1] for b in dropped])
        kept = [k for b, k in enumerate(kept) if b not in dropped]
        batch = batch.to(dev)
        prompts = prompt_only(batch, tok.pad_id) if need_gen else None
        repeat_B = torch.tensor([start + pos >= num_real for pos, *_ in kept], device=dev)
        batch.modality_ids[repeat_B] = -1  # route telemetry counts each sample once, on one rank
        out = forward_loss(model, batch)
        gen = [None] * len(kept)
        if need_gen:
            with telemetry.paused(model):  # decoding re-reads the prefix each step: count it once, above
                ids = greedy_generate(model, prompts, task.generation.max_new_tokens, tok.eos_id, tok.pad_id)
            gen = [tok.decode(x) for x in ids]
        for j, (_, idx, sample, ex) in enumerate(kept):
            rows.append(
                EvalRow(
                    idx,
                    out.nll_B[j].item(),
                    out.num_tokens_B[j].item(),
                    batch.target_bytes[j].item(),
                    gen[j],
                    ex.target_text,
                    task.group(sample),
                )
            )
    return rows, bad_idxs


def evaluate(
    model,
    cfg: ExperimentConfig,
    tasks: Sequence[Task],
    tok: TextTokenizer,
    split: str | None = None,
    max_samples: int | None = None,
    train_sets: Sequence[Sequence[Any]] | None = None,
    predictions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Metrics per task (and chance levels) on `split`; every rank must call it.

    `train_sets` (one per task) feed the chance levels; read from the cache when not given.
    `predictions`: a list that gets one record per sample (key, task, target, output, metrics).
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
            rows, bad = _task_rows(model, task, tid, samples, cfg, tok, split)
        by_index = {r.index: r for part in dist.gather(rows) for r in part}  # repeats from shard padding collapse
        task_rows = [by_index[i] for i in sorted(by_index)]
        res = score(task_rows, task.metrics, task.final_answer)
        bad = set().union(*dist.gather(bad))
        if bad:
            res["bad_samples"] = len(bad)
        if predictions is not None:
            predictions += [prediction(task, r, split) for r in task_rows]
        res["chance"] = {m: task.chance(m, train, samples) for m in task.metrics}
        results[task.name] = res
    if was_training:
        model.train()
    return results


def prediction(task: Task, row: EvalRow, split: str) -> dict[str, Any]:
    """One evaluated sample as `eval --predictions` writes it (output is null where the task's
    metrics need no decoding, as text_lm's bits per byte)."""
    return {
        "key": f"{split}[{row.index}]",
        "task": task.name,
        "target": row.target,
        "output": row.generated,
        "metrics": {k: round(v, 6) for k, v in sample_metrics(row, task.metrics, task.final_answer).items()},
    }


def run_eval(
    checkpoint: str,
    split: str | None = None,
    max_samples: int | None = None,
    out: str | None = None,
    overrides: dict[str, Any] | None = None,
    routes_out: str | None = None,
    predictions_out: str | None = None,
) -> dict[str, Any]:
    """Load a checkpoint (any process count), evaluate its tasks, print a table and write JSON.

    overrides: the user's --set values (nested dict); routes_out: also count where the evaluated
    tokens go and write a routes file there; predictions_out: also write one JSON line per sample.
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
    if predictions_out:
        output_file(predictions_out, "--predictions")
    rank, world = ds_engine.init_distributed(cfg.train.threads)
    moe = cfg.model.moe
    if moe.num_experts and (moe.ep_size > world or world % moe.ep_size):
        # Experts are stored one file each, so any ep_size that fits this run can load them.
        cfg = one_process(cfg)
    ensure_loaded(cfg.plugins)  # the user's (--set plugins=[...]); a checkpoint never names them
    declare_tasks(cfg)  # declared tasks are data, not code: the checkpoint's declarations are safe to use
    tasks = ckpt.checkpoint_tasks(opened)
    engine = ds_engine.initialize_for_eval(build_model(cfg.model, tok.vocab_size), cfg)
    ckpt.load_checkpoint(engine, tag_dir, with_optimizer=False)
    if routes_out:
        routes.start(engine)
    predictions: list[dict[str, Any]] | None = [] if predictions_out else None
    results = evaluate(engine, cfg, tasks, tok, split=split, max_samples=max_samples, predictions=predictions)
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
        if predictions_out:
            Path(predictions_out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(predictions_out, "".join(json.dumps(p) + "\n" for p in predictions))
            print(f"pathways-mm: wrote {len(predictions)} predictions to {predictions_out}", file=sys.stderr)
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
