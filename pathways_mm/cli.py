"""The `pathways-mm` command line. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from pathways_mm.errors import ConfigError, TrainingAborted

USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)


def run_guarded(fn: Callable[[], Any]) -> int:
    """Run `fn`; a user error becomes `pathways-mm: error: ...` on stderr and exit status 2,
    an aborted run (a silent rank, too many non-finite steps) the same line and status 1."""
    try:
        fn()
    except (*USER_ERRORS, TrainingAborted) as e:
        if os.environ.get("PMM_TRACEBACK"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"pathways-mm: error: {msg}", file=sys.stderr)
        return 1 if isinstance(e, TrainingAborted) else 2
    except KeyboardInterrupt:
        print("pathways-mm: interrupted", file=sys.stderr)
        return 130
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pathways_mm.config import load_config
    from pathways_mm.engine import setup_single_process_env, shutdown
    from pathways_mm.train import run

    def go() -> None:
        cfg = load_config(args.config, args.overrides)
        setup_single_process_env()
        run(cfg, resume=args.resume, stop_after=args.stop_after)
        shutdown()

    return run_guarded(go)


def cmd_eval(args: argparse.Namespace) -> int:
    from pathways_mm.engine import setup_single_process_env, shutdown
    from pathways_mm.evaluate import run_eval

    def go() -> None:
        setup_single_process_env()
        run_eval(args.checkpoint, split=args.split, max_samples=args.max_samples, out=args.out, overrides=args.overrides,
                 routes_out=args.routes)
        shutdown()

    return run_guarded(go)


def cmd_baseline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pathways_mm.baseline import run_baselines
    from pathways_mm.config import load_config
    from pathways_mm.engine import setup_single_process_env, shutdown

    def go() -> None:
        cfg = load_config(args.config, args.overrides)
        setup_single_process_env()
        run_baselines(cfg, args.task, Path(args.out_dir), compare=args.compare)
        shutdown()

    return run_guarded(go)


def cmd_add_task(args: argparse.Namespace) -> int:
    from pathways_mm.add_task import run_add_task
    from pathways_mm.engine import setup_single_process_env, shutdown

    def go() -> None:
        setup_single_process_env()
        run_add_task(args.source, args.task, args.grow_experts, args.steps, args.out_dir, args.config, args.overrides,
                     freeze=not args.train_all, adapter_rank=args.adapter_rank)
        shutdown()

    return run_guarded(go)


def cmd_export(args: argparse.Namespace) -> int:
    def go() -> None:
        from pathways_mm.engine import pin_accelerator

        pin_accelerator()
        from pathways_mm.export import run_export

        run_export(args.source, args.task, args.out, args.max_samples)

    return run_guarded(go)


def cmd_continual(args: argparse.Namespace) -> int:
    from pathways_mm.continual import main_cli

    return run_guarded(lambda: main_cli(args.config, args.overrides, args.out_dir))


def cmd_routes(args: argparse.Namespace) -> int:
    def go() -> None:
        from pathways_mm.routes_plot import draw

        paths = draw(args.routes, args.out, compare=args.compare)
        print(f"pathways-mm: wrote {len(paths)} files to {args.out} (open {paths[-1]})", file=sys.stderr)

    return run_guarded(go)


def cmd_tasks(args: argparse.Namespace) -> int:
    from pathways_mm.tasks import list_tasks, load_plugins

    def go() -> None:
        load_plugins(args.plugin)
        infos = list_tasks()
        w = max(len(i.name) for i in infos)
        print(f"{'task':<{w}}  {'modalities':<18} {'metrics':<28} source")
        for info in infos:
            mods = ",".join(info.modalities)
            metrics = ",".join(info.cls.metrics)
            print(f"{info.name:<{w}}  {mods:<18} {metrics:<28} {info.source}")

    return run_guarded(go)


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="CKPT", help="a run directory or one of its checkpoints")
    p.add_argument("--task", required=True, help="the registered task to add")
    p.add_argument("--grow-experts", type=int, default=0, metavar="G", help="experts per MoE layer that only the new task uses")
    p.add_argument("--adapter-rank", type=int, default=16, metavar="R",
                   help="rank of the new task's own low-rank updates of every block's attention and output (0 = none)")
    p.add_argument("--steps", type=int, default=300, help="training steps for the new task")
    p.add_argument("--out-dir", default=None, help="the new run directory (default: next to the source run, RUN+TASK)")
    p.add_argument("--config", default=None, help="optional YAML with train/data/eval settings (same model as the checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override train/data/eval settings, e.g. --set train.lr=1e-3")  # fmt: skip
    p.add_argument("--train-all", action="store_true",
                   help="baseline: train every weight on the new task (old tasks forget); for comparisons")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pathways-mm", description="One sparse model, many tasks, many modalities.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train an experiment in this process (CPU or one GPU)")
    t.add_argument("config", help="experiment YAML, e.g. configs/experiments/demo.yaml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    t.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="save a checkpoint and stop at this step (e.g. to fit a job's time limit); continue with --resume")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint: per-task table and a JSON report")
    e.add_argument("checkpoint", help="run directory (runs/NAME), its checkpoints/ folder, or one checkpoint")
    e.add_argument("--split", default=None, help="dataset split (default: the config's eval.split)")
    e.add_argument("--max-samples", type=int, default=None, help="samples per task (0 = all)")
    e.add_argument("--out", default=None, help="JSON report path (default: inside the checkpoint)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--routes", default=None, metavar="OUT.json",
                   help="also write where each task's tokens went in every MoE layer (see `pathways-mm routes`)")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("baseline", help="single-task dense baselines of an experiment (same active parameters)")
    b.add_argument("config", help="the multi-task experiment YAML, e.g. configs/experiments/demo.yaml")
    b.add_argument("--task", action="append", default=[], metavar="NAME",
                   help="baseline for this task only (repeatable; default: every task of the experiment)")
    b.add_argument("--out-dir", default="runs/baselines", help="one run directory per task under this folder")
    b.add_argument("--compare", default=None, metavar="EVAL_JSON",
                   help="the multi-task model's eval report (pathways-mm eval RUN --out FILE) for the comparison table")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    b.set_defaults(func=cmd_baseline)

    a = sub.add_parser("add-task", help="add a task to a trained model without forgetting the old ones")
    add_task_arguments(a)
    a.set_defaults(func=cmd_add_task)

    x = sub.add_parser("export", help="one task's sub-network: only the experts on its pathway, parity-checked")
    x.add_argument("--from", dest="source", required=True, metavar="CKPT", help="a run directory or one of its checkpoints")
    x.add_argument("--task", required=True, help="a task of the checkpoint")
    x.add_argument("--out", required=True, help="new folder for model.pt and export.json")
    x.add_argument("--max-samples", type=int, default=None,
                   help="evaluation samples that define the pathway and the parity check (default: eval.max_samples; 0 = all)")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("continual", help="continual benchmark: add tasks one at a time; add-task vs fine-tuning vs scratch")
    c.add_argument("config", help="experiment YAML with a continual: section, e.g. configs/experiments/continual.yaml")
    c.add_argument("--out-dir", default=None, help="results folder (default: runs/continual-NAME); rerun to continue")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(func=cmd_continual)

    r = sub.add_parser("routes", help="draw a routes file: heatmaps, pathway graph, reuse, modalities, routes.html")
    r.add_argument("routes", help="routes JSON written by `pathways-mm eval RUN --routes OUT.json`")
    r.add_argument("--compare", default=None, metavar="OTHER.json", help="also show what changed from OTHER.json")
    r.add_argument("--out", required=True, help="folder for the PNG figures and routes.html")
    r.set_defaults(func=cmd_routes)

    k = sub.add_parser("tasks", help="list registered tasks, their modalities and where they come from")
    k.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="also import this plugin module")
    k.set_defaults(func=cmd_tasks)

    try:
        from pathways_mm.bench import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
