"""The `pathways-mm` command line: the only argument parser. User errors print one line and exit 2.

One entry point for every command, in one process or under the DeepSpeed launcher:

    pathways-mm train CONFIG ...
    deepspeed --num_gpus N --module pathways_mm.cli train CONFIG ...

The launcher puts `--local_rank=R` before the command; the rank itself comes from the
environment it sets (RANK, WORLD_SIZE, ...). `train`, `eval`, `add-task`, `baseline` and the
`bench train`/`telemetry` benchmarks run on every rank; the one-process commands (`export`,
`routes`, `tasks`, `continual`, `bench moe`) do their work on rank 0 alone. Command modules are
imported inside the command functions so that `pathways-mm --help`, `tasks` and `routes` start
without loading DeepSpeed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pathways_mm.config import load_config, parse_overrides
from pathways_mm.errors import ConfigError, TrainingAborted, clip
from pathways_mm.io import NO_SPACE, describe_os_error

USER_ERRORS = (ConfigError, ValueError)


def _error(msg: str) -> None:
    """The one error line: its first line, cut short (a message never floods the terminal)."""
    print(f"pathways-mm: error: {clip(msg.splitlines()[0] if msg else 'unknown error', 1000)}", file=sys.stderr)


def run_guarded(fn: Callable[[], Any]) -> int:
    """Run `fn`; a user error becomes `pathways-mm: error: ...` on stderr and exit status 2,
    an aborted run (a silent rank, too many non-finite steps, a full disk) the same line and status 1.

    A file-system error (permissions, a file where a folder should be) is a user error too.
    """
    try:
        fn()
    except (*USER_ERRORS, TrainingAborted) as e:
        if os.environ.get("PMM_TRACEBACK"):
            raise
        _error(str(e) or type(e).__name__)
        return 1 if isinstance(e, TrainingAborted) else 2
    except OSError as e:
        if os.environ.get("PMM_TRACEBACK"):
            raise
        _error(describe_os_error(e) if e.errno is not None else str(e) or type(e).__name__)
        return 1 if e.errno in NO_SPACE else 2
    except KeyboardInterrupt:
        print("pathways-mm: interrupted", file=sys.stderr)
        return 130
    return 0


def on_rank_zero(fn: Callable[[], Any]) -> int:
    """`run_guarded` for a one-process command: under the deepspeed launcher only rank 0 runs it,
    the other ranks exit at once (status 0), so every command launches the same way."""
    if os.environ.get("RANK", "0") != "0":
        return 0
    return run_guarded(fn)


def in_process_group(fn: Callable[[], Any]) -> int:
    """`run_guarded` for a command that runs under torch.distributed: one process without a
    launcher gets the environment DeepSpeed expects, and every rank leaves the group together.

    Not on failure: a barrier there could wait for a rank that died.
    """
    import torch.distributed as dist

    from pathways_mm.runtime.engine import setup_single_process_env, shutdown

    def go() -> None:
        setup_single_process_env()
        fn()
        shutdown()

    code = run_guarded(go)
    if code != 0 and dist.is_available() and dist.is_initialized():
        # The group was not left (see above). Interpreter teardown would then destroy gloo's worker
        # threads while they still hold work and, now and then, abort the process (SIGABRT,
        # "terminate called without an active exception") after the error was printed. Every file
        # is closed by now: end here, with the status the error chose.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named parsed arguments as keyword arguments (flags named like the function's parameters)."""
    return {name: getattr(args, name) for name in names}


def cmd_train(args: argparse.Namespace) -> int:
    from pathways_mm.training.loop import run

    return in_process_group(
        lambda: run(
            load_config(args.config, args.overrides),
            resume=args.resume,
            stop_after=args.stop_after,
            overwrite=args.overwrite,
        )
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from pathways_mm.training.evaluate import run_eval

    return in_process_group(
        lambda: run_eval(
            args.checkpoint,
            split=args.split,
            max_samples=args.max_samples,
            out=args.out,
            overrides=parse_overrides(args.overrides),
            routes_out=args.routes,
            predictions_out=args.predictions,
        )
    )


def cmd_baseline(args: argparse.Namespace) -> int:
    from pathways_mm.studies.baseline import run_baselines

    return in_process_group(
        lambda: run_baselines(
            load_config(args.config, args.overrides), args.task, Path(args.out_dir), compare=args.compare
        )
    )


def cmd_add_task(args: argparse.Namespace) -> int:
    from pathways_mm.continual.add_task import AddTaskOptions, run_add_task

    def go() -> None:
        opts = AddTaskOptions(
            **_pick(args, "task", "grow_experts", "steps", "out_dir", "config", "adapter_rank", "resume", "start_from"),
            overrides=parse_overrides(args.overrides),
            freeze=not args.train_all,
        )
        run_add_task(args.source, opts)

    return in_process_group(go)


def cmd_predict(args: argparse.Namespace) -> int:
    from pathways_mm.inference.predict import run_predict

    opts = _pick(args, "image", "audio", "text", "out", "max_new_tokens", "batch_size", "device", "experts")
    return run_guarded(lambda: run_predict(args.source, args.task, input_path=args.input, **opts))


def cmd_samples(args: argparse.Namespace) -> int:
    from pathways_mm.inference.samples import write_samples

    return run_guarded(lambda: write_samples(args.out, args.task, count=args.count, split=args.split))


def cmd_upcycle(args: argparse.Namespace) -> int:
    from pathways_mm.continual.upcycle import run_upcycle

    opts = _pick(args, "num_experts", "top_k", "out", "moe_every")
    return in_process_group(lambda: run_upcycle(args.source, **opts))


def cmd_export(args: argparse.Namespace) -> int:
    from pathways_mm.inference.export import run_export

    return on_rank_zero(
        lambda: run_export(
            args.source, args.task, args.out, args.max_samples, parse_overrides(args.overrides), args.time_generation
        )
    )


def cmd_continual(args: argparse.Namespace) -> int:
    from pathways_mm.studies.continual import run_continual

    def go() -> None:
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out_dir) if args.out_dir else Path("runs") / f"continual-{cfg.name}"
        run_continual(cfg, out, seeds=args.seeds, only_seed=args.only_seed, say=lambda s: print(s, file=sys.stderr))

    return on_rank_zero(go)


def cmd_ablate(args: argparse.Namespace) -> int:
    from pathways_mm.studies.ablate import run_ablation

    def go() -> None:
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out_dir) if args.out_dir else Path("runs") / f"ablate-{cfg.name}"
        say = lambda s: print(s, file=sys.stderr)  # noqa: E731
        run_ablation(cfg, args.seeds, out, tuple(args.variant), say=say, lrs=tuple(args.lr))

    return run_guarded(go)


def cmd_routes(args: argparse.Namespace) -> int:
    from pathways_mm.viz.draw import draw

    def go() -> None:
        paths = draw(args.routes, args.out, compare=args.compare)
        print(f"pathways-mm: wrote {len(paths)} files to {args.out} (open {paths[-1]})", file=sys.stderr)

    return on_rank_zero(go)


def cmd_tasks(args: argparse.Namespace) -> int:
    from pathways_mm.data.taskset import resolve_tasks
    from pathways_mm.tasks import list_tasks, load_plugins

    def go() -> None:
        load_plugins(args.plugin)
        if args.config:
            resolve_tasks(load_config(args.config, args.overrides))  # its plugins and declared tasks
        infos = list_tasks()
        w = max(len(i.name) for i in infos)
        print(f"{'task':<{w}}  {'modalities':<18} {'metrics':<28} source")
        for info in infos:
            print(f"{info.name:<{w}}  {','.join(info.modalities):<18} {','.join(info.cls.metrics):<28} {info.source}")

    return on_rank_zero(go)


def cmd_bench_moe(args: argparse.Namespace) -> int:
    from pathways_mm.bench.moe import run_moe

    opts = _pick(args, "tokens", "dtype", "iters", "warmup", "capacity", "device", "threads", "stock_topk")
    return on_rank_zero(lambda: run_moe(args.config, json_out=args.json, **opts))


def cmd_bench_telemetry(args: argparse.Namespace) -> int:
    from pathways_mm.bench.telemetry import run_telemetry

    opts = _pick(args, "iters", "warmup", "threads")
    return in_process_group(lambda: run_telemetry(args.config, **opts))


def cmd_bench_train(args: argparse.Namespace) -> int:
    from pathways_mm.bench.train import run_train

    opts = _pick(args, "iters", "warmup", "batch", "seq_len", "dense", "threads")
    return in_process_group(
        lambda: run_train(args.config, peak_tflops_override=args.peak_tflops, json_out=args.json, **opts)
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from pathways_mm import plan

    def go() -> None:
        dims = _pick(args, "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab", "top_k", "expert_d_ff")
        shape = plan.model_shape(args.size, **dims, num_experts=args.experts, moe_every=args.moe_every)
        common = _pick(args, "seq_len", "precision", "context_gib", "fragmentation")
        common.update(gpus=args.gpus, gpu_mem_gib=args.gpu_mem, prefix_lm=not args.no_prefix_lm)
        if args.search:
            sizes = [m for m in plan.DEFAULT_MICRO_BATCHES if args.max_micro_batch is None or m <= args.max_micro_batch]
            found = plan.search(shape, micro_batches=sizes, **common)
            print(plan.format_search(found, limit=args.limit))
            if found:
                print(f"\nbest layout:\n{plan.format_plan(found[0])}")
            return
        layout = _pick(args, "ep_size", "zero_stage", "micro_batch", "checkpointing")
        print(plan.format_plan(plan.plan(shape, **layout, **common)))

    return run_guarded(go)


def cmd_bench_gpu_check(args: argparse.Namespace) -> int:
    from pathways_mm.bench.gpu_check import PARTS, failed_parts, run_gpu_check

    failed: list[str] = []

    def go() -> None:
        opts = _pick(args, "budget_s", "demo_config")
        parts = tuple(args.parts.split(",")) if args.parts else PARTS
        failed.extend(failed_parts(run_gpu_check(args.out, dry_run=args.dry_run or None, parts=parts, **opts)))

    rc = run_guarded(go)
    if failed:
        print(
            f"pathways-mm: gpu-check: {', '.join(failed)} did not finish; see {args.out}/gpu_check.log", file=sys.stderr
        )
    return rc or int(bool(failed))


def cmd_data_check(args: argparse.Namespace) -> int:
    from pathways_mm.data.check import check_data

    return run_guarded(lambda: check_data(load_config(args.config, args.overrides), num_workers=args.workers))


def cmd_data_example(args: argparse.Namespace) -> int:
    from pathways_mm.config import data_root
    from pathways_mm.data.examples import write_examples

    def go() -> None:
        sizes = {split: n for split, n in (("train", args.train), ("test", args.test)) if n is not None}
        path = write_examples(Path(args.out), data_root(), sizes=sizes)
        print(f"pathways-mm: wrote {args.out}; train on it with: pathways-mm train {path}", file=sys.stderr)

    return run_guarded(go)


def cmd_bench_data(args: argparse.Namespace) -> int:
    from pathways_mm.bench.data import run_data

    opts = _pick(args, "workers", "batches", "steps", "rows", "memory_only", "threads")
    return in_process_group(lambda: run_data(args.config, args.overrides, **opts))


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="your own data: check a config's declared tasks, write an example dataset")
    kinds = d.add_subparsers(dest="data", required=True, metavar="ACTION")
    c = kinds.add_parser("check", help="read every sample of every declared task and list the bad ones")
    c.add_argument("config", help="experiment YAML with a declare: section")
    c.add_argument("--workers", type=int, help="background readers (default: the config's data.num_workers)")
    _add_set(c)
    c.set_defaults(func=cmd_data_check)
    e = kinds.add_parser("example", help="write a small dataset in every source format and its experiment YAML")
    e.add_argument("out", help="new folder for the dataset")
    e.add_argument("--train", type=int, help="training samples per format (default 320)")
    e.add_argument("--test", type=int, help="test samples per format (default 80)")
    e.set_defaults(func=cmd_data_example)


def _add_set(p: argparse.ArgumentParser, what: str = "a config value") -> None:
    help = f"override {what}, e.g. --set train.lr=1e-3 (repeatable)"
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train an experiment (one process, or every rank under the deepspeed launcher)")
    t.add_argument("config", help="experiment YAML, e.g. configs/experiments/demo.yaml")
    _add_set(t)
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a train.out_dir that holds a run: first deletes its checkpoints/, routes/, "
        "metrics.jsonl and config.yaml (nothing else); without it (or --resume) such a folder is refused",
    )
    t.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="save and stop at this step (a job's time limit); continue with --resume",
    )
    t.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint: per-task table and a JSON report")
    e.add_argument("checkpoint", help="run directory (runs/NAME), its checkpoints/ folder, or one checkpoint")
    e.add_argument("--split", help="dataset split (default: the config's eval.split)")
    e.add_argument("--max-samples", type=int, help="samples per task (0 = all)")
    e.add_argument("--out", help="JSON report path (default: inside the checkpoint)")
    _add_set(e, "an eval/data setting or plugins=[module]")
    e.add_argument(
        "--routes",
        default=None,
        metavar="OUT.json",
        help="also write where each task's tokens went (see `pathways-mm routes`)",
    )
    e.add_argument(
        "--predictions",
        metavar="OUT.jsonl",
        help="also write one JSON line per sample: key, task, target, output, its metrics",
    )
    e.set_defaults(func=cmd_eval)


def _add_baseline(sub) -> None:
    b = sub.add_parser("baseline", help="single-task dense baselines of an experiment (same active parameters)")
    b.add_argument("config", help="the multi-task experiment YAML, e.g. configs/experiments/demo.yaml")
    b.add_argument(
        "--task", action="append", default=[], metavar="NAME", help="only this task (repeatable; default: every task)"
    )
    b.add_argument("--out-dir", default="runs/baselines", help="one run directory per task under this folder")
    b.add_argument("--compare", metavar="EVAL_JSON", help="the multi-task run's `eval --out` report, for the table")
    _add_set(b)
    b.set_defaults(func=cmd_baseline)


def _add_add_task(sub) -> None:
    a = sub.add_parser("add-task", help="add a task to a trained model without forgetting the old ones")
    a.add_argument("--from", dest="source", required=True, metavar="CKPT", help="a run or one of its checkpoints")
    a.add_argument("--task", required=True, help="the registered task to add")
    a.add_argument(
        "--grow-experts", type=int, default=0, metavar="G", help="experts per MoE layer for the new task only"
    )
    a.add_argument(
        "--adapter-rank", type=int, default=16, metavar="R", help="rank of the new task's adapters (0 = none)"
    )
    a.add_argument("--steps", type=int, default=300, help="training steps for the new task")
    a.add_argument("--out-dir", help="the new run directory (default: next to the source run, RUN+TASK)")
    a.add_argument("--config", help="YAML with train/data/eval settings (same model)")
    _add_set(a, "a train/data/eval setting or plugins=[module]")
    a.add_argument("--train-all", action="store_true", help="baseline: train every weight (old tasks forget)")
    a.add_argument(
        "--start-from",
        metavar="TASK",
        help="the old task whose pathway the new one starts from (default: the one its data fits best)",
    )
    a.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed add-task in --out-dir from its newest checkpoint (same --from and flags)",
    )
    a.set_defaults(func=cmd_add_task)


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="portable weights (safetensors): the whole model, or one task's sub-network")
    x.add_argument("--from", dest="source", required=True, metavar="CKPT", help="a run or one of its checkpoints")
    x.add_argument("--task", help="only this task's sub-network (the experts on its pathway, parity-checked)")
    x.add_argument("--out", required=True, help="new folder for model.safetensors and export.json")
    x.add_argument("--max-samples", type=int, help="samples that define the pathway and check parity (0 = all)")
    x.add_argument(
        "--time-generation",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="with --task: also time greedy generation on those samples, export vs full model (median of ROUNDS)",
    )
    _add_set(x, "an eval/data setting or plugins=[module]")
    x.set_defaults(func=cmd_export)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="a trained model's answers to your own images, WAV clips and text")
    p.add_argument("source", metavar="RUN", help="a run directory, one of its checkpoints, or an export folder")
    p.add_argument("--task", help="the task to answer (with --input: for lines that name none)")
    p.add_argument("--image", metavar="FILE", help="an image file (PNG, JPEG, ...; ink bright on dark)")
    p.add_argument("--audio", metavar="FILE", help="a PCM WAV file at the model's rate (16 kHz)")
    p.add_argument("--text", metavar="TEXT", help="the prompt text")
    p.add_argument("--input", metavar="FILE.jsonl", help="many inputs: one JSON object per line (task, image, ...)")
    p.add_argument("--out", metavar="FILE.jsonl", help="with --input: where the answers go (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: the task's)")
    p.add_argument("--batch-size", type=int, help="inputs per forward with --input (default: eval.batch_size)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if there is one)")
    p.add_argument("--experts", action="store_true", help="also give each token's experts in every MoE layer")
    p.set_defaults(func=cmd_predict)
    s = sub.add_parser("samples", help="held-out test inputs as PNG/WAV files, to try `predict` on")
    s.add_argument("--out", required=True, help="folder for the files and inputs.jsonl")
    s.add_argument(
        "--task", action="append", default=[], metavar="NAME", help="this task only (repeatable; default: all)"
    )
    s.add_argument("--count", type=int, default=3, help="inputs per task")
    s.add_argument("--split", default="test", help="dataset split")
    s.set_defaults(func=cmd_samples)


def _add_upcycle(sub) -> None:
    u = sub.add_parser("upcycle", help="turn a trained dense model into an MoE model (experts copied from its FFNs)")
    u.add_argument("--from", dest="source", required=True, metavar="DENSE_RUN", help="a dense run or checkpoint")
    u.add_argument("--num-experts", type=int, required=True, metavar="E", help="experts per MoE layer")
    u.add_argument("--top-k", type=int, required=True, metavar="K", help="experts per token")
    u.add_argument("--moe-every", type=int, metavar="N", help="every N-th FFN becomes MoE (default: the config's, 2)")
    u.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="new run directory; continue it with `train DIR/config.yaml --resume`",
    )
    u.set_defaults(func=cmd_upcycle)


def _add_continual(sub) -> None:
    c = sub.add_parser("continual", help="continual benchmark: add-task vs fine-tuning vs scratch")
    c.add_argument("config", help="experiment YAML with a continual: section")
    c.add_argument("--seeds", type=int, default=3, help="seeds, each its own chain of runs (default 3)")
    c.add_argument(
        "--only-seed",
        type=int,
        metavar="S",
        help="run seed S's chain alone (one process per seed); the last one to finish writes the table",
    )
    c.add_argument("--out-dir", help="results folder (default: runs/continual-NAME); rerun to continue")
    _add_set(c)
    c.set_defaults(func=cmd_continual)


def _add_ablate(sub) -> None:
    a = sub.add_parser("ablate", help="what multi-task training, sparsity and task-specific pathways each buy")
    a.add_argument("config", help="experiment YAML, e.g. configs/experiments/demo.yaml (its routing is the new one)")
    a.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    a.add_argument("--variant", action="append", default=[], metavar="NAME", help="only this variant (repeatable)")
    a.add_argument("--out-dir", help="results folder (default: runs/ablate-NAME); rerun to continue")
    a.add_argument(
        "--lr",
        type=float,
        action="append",
        default=[],
        help="learning-rate screen: every variant at each rate given instead of train.lr (repeatable; give three, with --seeds 1)",
    )
    _add_set(a)
    a.set_defaults(func=cmd_ablate)


def _add_routes_and_tasks(sub) -> None:
    r = sub.add_parser("routes", help="draw a routes file: heatmaps, pathways, reuse, routes.html")
    r.add_argument("routes", help="routes JSON from `pathways-mm eval RUN --routes OUT.json`")
    r.add_argument("--compare", metavar="OTHER.json", help="also show what changed from OTHER.json")
    r.add_argument("--out", required=True, help="folder for the PNG figures and routes.html")
    r.set_defaults(func=cmd_routes)
    k = sub.add_parser("tasks", help="list registered tasks, their modalities and where they come from")
    k.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="also import this plugin module")
    k.add_argument("--config", help="also list the tasks this experiment YAML declares (and its plugins' tasks)")
    _add_set(k)
    k.set_defaults(func=cmd_tasks)


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: an MoE layer, full training steps, route telemetry")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    m = kinds.add_parser("moe", help="one MoE FFN layer vs a FLOP-matched dense FFN")
    m.add_argument("--config", choices=["cpu", "h200-a", "h200-b", "h200-c"], default="cpu", help="layer sizes")
    m.add_argument("--tokens", type=int, help="tokens per step (default: the config's)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--iters", type=int, default=10)
    m.add_argument("--warmup", type=int, default=3)
    m.add_argument("--capacity", type=float, default=1.25, help="capacity factor of the capacity-based rows")
    m.add_argument("--device", help="default: cuda if available, else cpu")
    m.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    m.add_argument("--stock-topk", action="store_true", help="also time DeepSpeed's stock gate for top_k > 2")
    m.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    m.set_defaults(func=cmd_bench_moe)
    t = kinds.add_parser("train", help="full training steps of a pathways-mm model: tokens/s, MFU, peak memory")
    t.add_argument("--config", choices=["cpu", "1b"], default="cpu", help="model and batch (1b: one GPU)")
    t.add_argument("--iters", type=int, default=10, help="timed steps per row")
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--batch", type=int, help="micro batch (default: the config's)")
    t.add_argument("--seq-len", type=int, help="sequence length (default: the config's)")
    t.add_argument("--dense", action="store_true", help="also time the FLOP-matched dense model")
    t.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: by GPU name)")
    t.add_argument("--threads", type=int, default=0, help="CPU threads (0 = one process's share of the cores)")
    t.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    t.set_defaults(func=cmd_bench_train)
    g = kinds.add_parser("gpu-check", help="every GPU figure in one run of minutes (a dry run without CUDA)")
    g.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json, .md and .log")
    g.add_argument("--dry-run", action="store_true", help="tiny configs even on a GPU (default: only without CUDA)")
    g.add_argument("--budget-s", type=float, help="the check ends within this many seconds (default: 450 on a GPU)")
    g.add_argument("--parts", help="comma-separated subset of the parts (default all; a rerun of what failed)")
    g.add_argument("--demo-config", default="configs/experiments/demo.yaml", help="experiment of the training run")
    g.set_defaults(func=cmd_bench_gpu_check)
    y = kinds.add_parser("telemetry", help="a full training step with route telemetry on vs off")
    y.add_argument("--config", choices=["cpu", "gpu"], default="cpu", help="model and batch size")
    y.add_argument("--iters", type=int, default=30, help="timed steps per mode")
    y.add_argument("--warmup", type=int, default=3)
    y.add_argument("--threads", type=int, default=0, help="CPU threads (0 = one process's share of the cores)")
    y.set_defaults(func=cmd_bench_telemetry)
    d = kinds.add_parser("data", help="input pipeline: samples/s per task and worker count; live vs pre-made batches")
    d.add_argument("--config", default="configs/experiments/demo.yaml", help="experiment YAML (its tasks and model)")
    _add_set(d)
    d.add_argument("--workers", default="0,1,2", help="worker counts to time, comma-separated")
    d.add_argument("--batches", type=int, default=20, help="micro-batches timed per task and worker count")
    d.add_argument("--steps", type=int, default=20, help="training steps timed per row (live and pre-made)")
    d.add_argument("--rows", type=int, default=0, help="also measure resident bytes per row of an N-row manifest")
    d.add_argument("--memory-only", action="store_true", help="only the --rows measurement (no timing)")
    d.add_argument("--threads", type=int, default=0, help="CPU threads of the training step (0 = torch's default)")
    d.set_defaults(func=cmd_bench_data)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory and all-to-all bytes of a training layout, on paper")
    m = p.add_argument_group("model (a named size, any dimension overriding it, or every dimension)")
    m.add_argument("--size", help="debug, tiny, small, base or 1b")
    for flag in ("--d-model", "--n-layers", "--n-heads", "--n-kv-heads", "--d-ff"):
        m.add_argument(flag, type=int)
    m.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default: this repository's tokenizer)")
    m.add_argument("--experts", type=int, default=0, help="experts per MoE layer (0 = dense)")
    m.add_argument("--top-k", type=int, default=2)
    m.add_argument("--expert-d-ff", type=int, help="hidden size of one expert (default: d_ff)")
    m.add_argument("--moe-every", type=int, default=2, help="every N-th block's FFN is an MoE layer")
    g = p.add_argument_group("machines and layout")
    g.add_argument("--gpus", type=int, required=True)
    g.add_argument("--gpu-mem", type=float, required=True, metavar="GIB", help="memory of one GPU in GiB")
    g.add_argument("--ep-size", type=int, default=1, help="experts split over this many GPUs")
    g.add_argument("--zero-stage", type=int, default=0, help="ZeRO stage 0, 1 or 2")
    g.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-step")
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    g.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    g.add_argument("--no-prefix-lm", action="store_true", help="causal mask only (no [B, 1, L, L] prefix bias)")
    g.add_argument("--context-gib", type=float, default=1.0, help="CUDA context, NCCL and workspaces per GPU")
    g.add_argument("--fragmentation", type=float, default=0.10, help="allocator overhead, a share of the rest")
    p.add_argument("--search", action="store_true", help="list the layouts that fit (ep_size, ZeRO, micro-batch)")
    p.add_argument("--limit", type=int, default=20, help="rows of --search")
    p.add_argument("--max-micro-batch", type=int, help="--search: largest micro-batch tried (default: 32)")
    p.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pathways-mm", description="One sparse model, many tasks, many modalities.")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_train,
        _add_eval,
        _add_baseline,
        _add_add_task,
        _add_export,
        _add_predict,
        _add_upcycle,
        _add_continual,
        _add_ablate,
        _add_routes_and_tasks,
        _add_data,
        _add_bench,
        _add_plan,
    ):
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
