"""Single-task dense baselines of a multi-task sparse experiment: `pathways-mm baseline`.

For each task the baseline is a dense model with the sparse model's active parameters per token
(every FFN `top_k x expert_d_ff` wide), trained on that task alone on as many of its samples as
the multi-task run drew for it (`steps x` the task's mixture share), with the same batch size,
learning rate and evaluation. The comparison says what sharing one sparse model costs or gives.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathways_mm.config import ExperimentConfig, ModelConfig
from pathways_mm.data.taskset import load_tasks, make_sampler
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text, output_dir
from pathways_mm.training.evaluate import load_report
from pathways_mm.training.loop import run, run_files


def dense_counterpart(m: ModelConfig) -> ModelConfig:
    """The dense model whose FFNs are as wide as the experts a token visits, the shared expert
    included (same active parameters)."""
    if not m.moe.num_experts:
        return m
    width = m.moe.top_k * (m.moe.expert_d_ff or m.d_ff) + m.moe.shared_d_ff
    if m.moe.moe_every != 1 and width != m.d_ff:
        raise ConfigError(
            f"model.moe.top_k x expert_d_ff + shared_d_ff = {width} differs from model.d_ff = {m.d_ff} while dense layers remain "
            "(moe_every > 1): no single dense width matches the active parameters; make them equal"
        )
    return dataclasses.replace(m, d_ff=width, moe=dataclasses.replace(m.moe, num_experts=0, shared_d_ff=0))


def baseline_config(cfg: ExperimentConfig, task: str, share: float, out_dir: Path) -> ExperimentConfig:
    """`cfg` reduced to `task` alone, dense, for `share` of its steps."""
    steps = max(1, round(cfg.train.steps * share))
    train = dataclasses.replace(
        cfg.train,
        steps=steps,
        warmup_steps=max(1, round(cfg.train.warmup_steps * share)),
        save_every=0,
        eval_every=0,
        out_dir=str(out_dir / task),
    )
    weights = {k: v for k, v in cfg.mixture.weights.items() if k == task}
    return cfg.replace(
        name=f"{cfg.name}-baseline-{task}",
        tasks=(task,),
        model=dense_counterpart(cfg.model),
        train=train,
        mixture=dataclasses.replace(cfg.mixture, weights=weights),
    )


def mixture_shares(cfg: ExperimentConfig) -> dict[str, float]:
    """Each task's probability in the multi-task mixture (needs the train splits' sizes)."""
    ts = load_tasks(cfg)
    sampler = make_sampler(cfg, ts)
    return {t.name: float(p) for t, p in zip(ts.tasks, sampler.probs)}


def comparison_table(multi: dict[str, Any], single: dict[str, dict[str, Any]], steps: dict[str, int]) -> str:
    """Markdown: per task and metric, the multi-task model next to its single-task dense baseline."""
    lines = [
        "| task | metric | multi-task sparse | single-task dense | chance | baseline steps |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task, res in single.items():
        for metric, chance in res["chance"].items():
            m = multi.get(task, {}).get(metric)
            mm = "-" if m is None else f"{m:.3f}"
            c = "-" if chance is None else f"{chance:.3f}"
            lines.append(f"| {task} | {metric} | {mm} | {res[metric]:.3f} | {c} | {steps[task]} |")
    return "\n".join(lines)


def run_baselines(
    cfg: ExperimentConfig, tasks: Sequence[str], out_dir: Path, compare: str | None = None
) -> dict[str, Any]:
    """Train and evaluate one baseline per task, one after another in this process; print the comparison.

    Each baseline is its own run directory under `out_dir`; a rerun continues (or re-evaluates) it.
    """
    unknown = [t for t in tasks if t not in cfg.tasks]
    if unknown:
        raise ConfigError(f"--task {unknown[0]}: not one of the experiment's tasks {list(cfg.tasks)}")
    multi = load_report(compare, "--compare file") if compare else {}  # checked before any training
    output_dir(out_dir, "--out-dir")
    shares = mixture_shares(cfg)
    single, steps = {}, {}
    for task in tasks or cfg.tasks:
        bcfg = baseline_config(cfg, task, shares[task], out_dir)
        steps[task] = bcfg.train.steps
        print(
            f"pathways-mm: baseline {task}: dense, {bcfg.train.steps} steps ({shares[task]:.1%} of {cfg.train.steps})",
            file=sys.stderr,
        )
        summary = run(bcfg, resume=bool(run_files(Path(bcfg.train.out_dir))))
        single[task] = summary["eval"][task]
        atomic_write_text(
            Path(bcfg.train.out_dir, "eval.json"),
            json.dumps({"tasks": summary["eval"], "steps": steps[task]}, indent=2),
        )
    table = comparison_table(multi, single, steps)
    print(table)
    return {"single": single, "steps": steps, "table": table}
