"""Evaluation: per-task metrics on a held-out split, sharded over ranks, gathered on rank 0.

    pathways-mm eval CKPT [--split test] [--max-samples N] [--out FILE.json] [--routes ROUTES.json]
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from pathways_mm import engine as ds_engine
from pathways_mm.checkpoint import atomic_write_text
from pathways_mm.config import ExperimentConfig, config_from_dict, data_root, one_process
from pathways_mm.collate import PAD_MODALITY, TEXT, Batch, collate, prompt_only
from pathways_mm.data import encode, load_split
from pathways_mm.encoders.text import TextTokenizer, load_tokenizer
from pathways_mm.losses import forward_loss
from pathways_mm.model import build_model
from pathways_mm.routing import telemetry
from pathways_mm.tasks import Task, ensure_loaded, get_task


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@torch.no_grad()
def greedy_generate(model, batch: Batch, max_new_tokens: int, eos_id: int, pad_id: int) -> list[list[int]]:
    """Greedy decoding from each prefix; always runs `max_new_tokens` forwards (ranks stay in step).

    The multimodal prefix is embedded once; each step appends the new tokens' embeddings.
    """
    net = getattr(model, "module", model)  # a DeepSpeed engine wraps the PathwaysModel
    B = len(batch)
    dev = batch.tokens.device
    x_BLD = net.embed(batch)
    lengths = batch.lengths.clone()
    out: list[list[int]] = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    step = dataclasses.replace(batch)
    for _ in range(max_new_tokens):
        last_BL = torch.zeros(step.tokens.shape, dtype=torch.bool, device=dev)
        last_BL[rows, lengths - 1] = True
        nxt = net.run(x_BLD, step, last_BL).logits.argmax(-1)  # [B]: row-major order is row order
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        step.tokens = torch.cat([step.tokens, torch.full((B, 1), pad_id, dtype=step.tokens.dtype, device=dev)], dim=1)
        # route telemetry reads one modality id per position: a generated token is text, the rest padding
        step.modality_ids = torch.cat([step.modality_ids, torch.full_like(step.modality_ids[:, :1], PAD_MODALITY)], dim=1)
        step.modality_ids[rows, lengths] = TEXT
        step.tokens[rows, lengths] = nxt
        x_BLD = torch.cat([x_BLD, x_BLD.new_zeros(B, 1, x_BLD.shape[-1])], dim=1)
        x_BLD[rows, lengths] = net.decoder.tok_embed(nxt).to(x_BLD.dtype)
        for i in (~finished).nonzero().flatten().tolist():
            if nxt[i].item() != eos_id:
                out[i].append(nxt[i].item())
        finished |= nxt == eos_id
        lengths = lengths + 1
    return out


def _shard(items: list[Any], rank: int, world: int) -> tuple[list[Any], int]:
    """Every rank gets the same number of items (the last ones repeat) so collectives line up.

    Returns the items and how many of them are this rank's own (the rest are repeats).
    """
    per = math.ceil(len(items) / world)
    mine = items[rank * per : (rank + 1) * per]
    return (mine + [items[-1]] * (per - len(mine)) if mine else [items[-1]] * per), len(mine)


class EvalRow(NamedTuple):
    """What one evaluated sample contributes to its task's metrics."""

    index: int  # position in the split (shard padding repeats some; they collapse on it)
    nll: float  # summed over the target tokens, in nats
    num_tokens: int
    num_bytes: int  # UTF-8 bytes of the target text
    generated: str | None  # greedy output, for generation metrics
    target: str
    group: str | None  # Task.group(sample)


def _task_results(model, task: Task, tid: int, samples: list[Any], cfg, tok: TextTokenizer, rank: int,
                  world: int, split: str) -> list[EvalRow]:
    """One EvalRow per sample of this rank's shard."""
    indexed = list(enumerate(samples))
    mine, num_real = _shard(indexed, rank, world)
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
            rows.append(EvalRow(idx, out.nll_B[j].item(), out.num_tokens_B[j].item(), batch.target_bytes[j].item(),
                                gen[j], examples[j].target_text, task.group(sample)))
    return rows


def _metrics(task: Task, rows: list[EvalRow], by_group: bool = True) -> dict[str, Any]:
    """Corpus-level metrics of `rows`; with groups, the same metrics per group under "groups"."""
    nll = sum(r.nll for r in rows)
    ntok = sum(r.num_tokens for r in rows)
    nbytes = sum(r.num_bytes for r in rows)
    res: dict[str, float] = {"n": len(rows), "loss": nll / max(ntok, 1)}
    if "bits_per_byte" in task.metrics:
        res["bits_per_byte"] = nll / math.log(2) / max(nbytes, 1)
    pairs = [(task.final_answer(r.generated), task.final_answer(r.target)) for r in rows if r.generated is not None]
    if "exact_match" in task.metrics:
        res["exact_match"] = sum(g == t for g, t in pairs) / len(rows)
    if "char_error_rate" in task.metrics:
        errs = sum(edit_distance(g, t) for g, t in pairs)
        res["char_error_rate"] = errs / max(1, sum(len(t) for _, t in pairs))
    groups = sorted({r.group for r in rows if r.group is not None})
    if by_group and groups:
        res["groups"] = {g: _metrics(task, [r for r in rows if r.group == g], by_group=False) for g in groups}
    return res


def evaluate(model, cfg: ExperimentConfig, tasks: Sequence[Task], tok: TextTokenizer, rank: int = 0, world: int = 1,
             split: str | None = None, max_samples: int | None = None,
             train_sets: Sequence[Sequence[Any]] | None = None) -> dict[str, Any]:
    """Metrics per task (and chance levels) on `split`; every rank must call it.

    `train_sets` (one per task) feed the chance levels; read from the cache when not given.
    """
    import torch.distributed as dist

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
            rows = _task_results(model, task, tid, samples, cfg, tok, rank, world, split)
        gathered: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, rows)
        else:
            gathered = [rows]
        by_index = {r.index: r for part in gathered for r in part}  # repeats from shard padding collapse
        res = _metrics(task, [by_index[i] for i in sorted(by_index)])
        res["chance"] = {m: task.chance(m, train, samples) for m in task.metrics}
        results[task.name] = res
    if was_training:
        model.train()
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'task':<20} {'metric':<16} {'value':>8} {'chance':>8} {'n':>6}"]
    for name, res in results.items():
        for metric, chance in res["chance"].items():
            c = "-" if chance is None else f"{chance:.3f}"
            lines.append(f"{name:<20} {metric:<16} {res[metric]:>8.3f} {c:>8} {res['n']:>6}")
    return "\n".join(lines)


def routes_data(results: dict[str, Any], split: str) -> dict[str, Any]:
    """What a routes file counted: the evaluated samples (teacher-forced; generation not counted)."""
    return {"split": split, "samples": {name: res["n"] for name, res in results.items()}}


def eval_ds_config() -> dict[str, Any]:
    """Inference only: no optimizer; bf16 on a GPU, float32 on a CPU."""
    ds: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}
    if torch.cuda.is_available():
        ds["bf16"] = {"enabled": True}
    return ds


def run_eval(ckpt: str, split: str | None = None, max_samples: int | None = None, out: str | None = None,
             overrides: Sequence[str] = (), routes_out: str | None = None) -> dict[str, Any]:
    """Load a checkpoint (any process count), evaluate its tasks, print a table and write JSON.

    routes_out: also count where the evaluated tokens go and write a routes file there.
    """
    from pathways_mm import routes

    ds_engine.pin_accelerator()
    import deepspeed

    from pathways_mm.config import merge_dicts, parse_overrides
    from pathways_mm.train import check_compatible

    tag_dir = ds_engine.resolve_checkpoint(ckpt)
    meta = ds_engine.read_meta(tag_dir)
    user = parse_overrides(list(overrides))
    source = meta["config"].get("source")
    cfg = config_from_dict(merge_dicts(meta["config"], user), source=source if isinstance(source, str) else None)
    rank, world = ds_engine.init_distributed(cfg.train.threads)
    moe = cfg.model.moe
    if moe.num_experts and (moe.ep_size > world or world % moe.ep_size):
        # Experts are stored one file each, so any ep_size that fits this run can load them.
        cfg = one_process(cfg)
    tok = load_tokenizer()
    check_compatible(meta, cfg, tok, where=str(tag_dir / ds_engine.META_FILE))
    # Only plugins the user names are imported: a checkpoint from someone else must not choose code to run.
    ensure_loaded(cfg.plugins if "plugins" in user else ())
    table = meta["task_table"]
    tasks = [get_task(name) for name in sorted(table, key=table.get)]
    model = build_model(cfg.model, tok.vocab_size).to(ds_engine.device())
    engine, *_ = deepspeed.initialize(model=model, config=eval_ds_config())
    ds_engine.bound_all_groups(cfg.train.collective_timeout_s)
    ds_engine.load_checkpoint(engine, tag_dir, with_optimizer=False)
    if routes_out:
        routes.start(engine)
    results = evaluate(engine, cfg, tasks, tok, rank, world, split=split, max_samples=max_samples)
    report = {"checkpoint": str(tag_dir), "step": meta["step"], "split": split or cfg.eval.split, "tasks": results}
    if routes_out:
        ckpt_id = {"path": str(tag_dir.resolve()), "tag": tag_dir.name, "step": meta["step"],
                   "tokenizer_hash": meta.get("tokenizer_hash")}  # fmt: skip
        doc = routes.finish(engine, cfg, [t.name for t in tasks], ckpt_id, routes_data(results, report["split"]))
        if rank == 0:
            print(f"pathways-mm: wrote {routes.write(routes_out, doc)}", file=sys.stderr)
    if rank == 0:
        print(format_table(results))
        path = Path(out) if out else tag_dir / f"eval_{report['split']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=2))
        print(f"pathways-mm: wrote {path}", file=sys.stderr)
    return report
