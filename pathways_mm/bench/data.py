"""`pathways-mm bench data`: the input pipeline of an experiment.

1. Samples/s of the pipeline (read, decode, augment, collate) per task and per worker count:
   micro-batches of that task alone through the DataLoader, timed after the first one arrives
   (worker start-up excluded).
2. A full training step (forward, backward, optimizer) fed by the DataLoader vs the same step on
   the same batches made beforehand; ratio live / pre-made from one run, in two blocks in
   opposite orders so drift on a shared host hits both rows alike. Live loading is free when the
   ratio is 1.00; the target is 1.05 with the workers that fit.
3. With --rows N: resident memory per row of an N-row JSONL and CSV manifest once its source is
   open (the index), after reading 1,000 random rows.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathways_mm.bench.common import where
from pathways_mm.config import ExperimentConfig, load_config
from pathways_mm.data.loader import micro_batches
from pathways_mm.data.sampler import MixtureSampler
from pathways_mm.data.sources.manifest import CsvSource, JsonlSource
from pathways_mm.data.taskset import LoadedBatch, TaskSet, load_batch, load_tasks, make_sampler
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.errors import ConfigError
from pathways_mm.model.model import build_model
from pathways_mm.runtime import engine as ds_engine
from pathways_mm.runtime.timing import sync
from pathways_mm.training.losses import forward_loss


def pipeline_rates(cfg: ExperimentConfig, ts: TaskSet, workers: list[int], batches: int) -> dict[str, dict[int, float]]:
    """Samples/s of each task's micro-batches, per worker count."""
    tok = load_tokenizer()
    B = cfg.train.micro_batch_size
    rates: dict[str, dict[int, float]] = {}
    for task, train in zip(ts.tasks, ts.train):
        one = TaskSet([task], [train])
        sampler = MixtureSampler([len(train)], 1.0, cfg.seed, micro_batches=cfg.train.grad_accum)
        rates[task.name] = {}
        for w in workers:
            it = micro_batches(cfg, one, sampler, tok, 0, 0, stop=batches + 1, num_workers=w)
            next(it)  # workers started, the first batch made
            t0 = time.perf_counter()
            n = sum(1 for _ in it)
            rates[task.name][w] = n * B / (time.perf_counter() - t0)
    return rates


def step_ratio(cfg: ExperimentConfig, ts: TaskSet, workers: int, steps: int) -> tuple[float, float]:
    """(ms per step fed by the DataLoader, ms per step on pre-made batches) over the same batches:
    steps 1..n live, 1..n pre-made, n+1..2n pre-made, n+1..2n live."""
    tok = load_tokenizer()
    _, world = ds_engine.init_distributed()
    torch.manual_seed(cfg.seed)
    engine = ds_engine.initialize(build_model(cfg.model, tok.vocab_size), cfg, world)
    dev = ds_engine.device()
    sampler = make_sampler(cfg, ts)
    A = cfg.train.grad_accum

    def train_step(loaded: list[LoadedBatch]) -> None:
        for lb in loaded:
            engine.backward(forward_loss(engine, lb.batch.to(dev)).loss)
            engine.step()

    def live(first: int) -> float:
        it = micro_batches(cfg, ts, sampler, tok, 0, first - 1, stop=first + steps, num_workers=workers)
        train_step([next(it) for _ in range(A)])  # untimed: workers start, the pipeline fills
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step([next(it) for _ in range(A)])
        sync(dev)
        return (time.perf_counter() - t0) * 1e3 / steps

    def premade(first: int) -> float:
        made = [[load_batch(cfg, ts, sampler, tok, s, m, 0) for m in range(A)] for s in range(first, first + steps)]
        sync(dev)
        t0 = time.perf_counter()
        for loaded in made:
            train_step(loaded)
        sync(dev)
        return (time.perf_counter() - t0) * 1e3 / steps

    train_step([load_batch(cfg, ts, sampler, tok, 0, m, 0) for m in range(A)])  # warm-up
    live_ms = [live(1)]
    pre_ms = [premade(1), premade(steps + 1)]
    live_ms.append(live(steps + 1))
    return sum(live_ms) / 2, sum(pre_ms) / 2


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def manifest_memory(rows: int) -> dict[str, dict[str, float]]:
    """Resident bytes per row of an open `rows`-row manifest (JSONL and CSV), and of its index alone."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, csv = Path(tmp) / "m.jsonl", Path(tmp) / "m.csv"
        with jsonl.open("w") as fj, csv.open("w") as fc:
            fc.write("image,audio,caption\n")
            for start in range(0, rows, 100_000):
                n = range(start, min(rows, start + 100_000))
                fj.write("".join(json.dumps({"image": f"img/{i:07d}.png", "caption": f"row {i}"}) + "\n" for i in n))
                fc.write("".join(f"img/{i:07d}.png,wav/{i:07d}.wav,row {i}\n" for i in n))
        for name, open_source in (
            ("jsonl", lambda: JsonlSource(jsonl, ["image", "caption"])),
            ("csv", lambda: CsvSource(csv, ["image", "audio", "caption"], Path(tmp) / "cache")),
        ):
            open_source()  # a CSV index is built once and cached: measure a run that reads the cache
            gc.collect()
            before = _rss()
            source = open_source()
            gc.collect()
            opened = _rss()
            for i in np.random.default_rng(0).integers(rows, size=1000).tolist():
                source.read(i)
            gc.collect()
            out[name] = {
                "open": (opened - before) / rows,
                "after_reads": (_rss() - before) / rows,
                "index": source.index_bytes() / rows,
            }
            del source
    return out


def run_data(
    config: str,
    overrides: list[str] = (),
    *,
    workers: str = "0,1,2",
    batches: int = 20,
    steps: int = 20,
    rows: int = 0,
    memory_only: bool = False,
    threads: int = 0,
) -> dict[str, Any]:
    """Print the tables (with `memory_only`, only the memory one); returns their figures."""
    try:
        counts = sorted({int(w) for w in workers.split(",")})
    except ValueError:
        raise ConfigError(f"--workers {workers!r}: give worker counts like 0,1,2") from None
    if min(counts) < 0 or batches < 1 or steps < 1 or rows < 0:
        raise ConfigError("--workers must be >= 0, --batches and --steps >= 1, --rows >= 0")
    result: dict[str, Any] = {}
    if rows:
        result["memory"] = mem = manifest_memory(rows)
        print(f"resident memory of a {rows:,}-row manifest, bytes per row (RSS change / rows)")
        print(f"{'format':<8} {'opened':>10} {'+1k reads':>10} {'index':>10}")
        for name, m in mem.items():
            print(f"{name:<8} {m['open']:10.1f} {m['after_reads']:10.1f} {m['index']:10.1f}")
    if memory_only:
        return result
    cfg = load_config(config, overrides)
    ds_engine.init_distributed(threads or cfg.train.threads)
    ts = load_tasks(cfg)
    B = cfg.train.micro_batch_size
    dev = ds_engine.device()
    print(
        f"bench data --config {config}: {len(ts.tasks)} tasks, micro-batch {B}, {cfg.model.size} model on {where(dev)}; "
        f"{os.cpu_count()} CPU cores"
    )
    rates = pipeline_rates(cfg, ts, counts, batches)
    print(f"input pipeline alone, samples/s over {batches} micro-batches of one task (after the first)")
    print(f"{'task':<20}" + "".join(f"{f'{w} workers':>12}" for w in counts))
    for name, per in rates.items():
        print(f"{name:<20}" + "".join(f"{per[w]:12,.0f}" for w in counts))
    live_workers = cfg.data.num_workers or max(counts)
    live, pre = step_ratio(cfg, ts, live_workers, steps)
    print(f"training step ({steps} steps x 2 blocks each): ms per step")
    print(f"{'fed by the DataLoader':<32} {live:9.1f}  ({live_workers} workers)")
    print(f"{'pre-made batches':<32} {pre:9.1f}")
    print(f"ratio live / pre-made: {live / pre:.3f} (target <= 1.05)")
    result.update(samples_per_s=rates, live_ms=live, premade_ms=pre, ratio=live / pre, workers=live_workers)
    return result
