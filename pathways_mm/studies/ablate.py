"""The ablation: what multi-task training, sparsity and task-specific pathways each buy.

    pathways-mm ablate CONFIG --seeds N [--out-dir DIR] [--variant NAME ...] [--set key=value ...]

At equal active parameters and equal samples per task, on CONFIG's tasks and schedule:

  single_dense      one dense model per task (`pathways-mm baseline`: the task's share of the steps)
  multi_dense       one dense model on every task
  sparse_tokens     MoE, plain token routing: no task prior, load balance over all tokens
  sparse_pathways   MoE, the original pathways: a learned prior per task, balance per task
  sparse_specific   MoE, task-specific pathways: CONFIG's own routing (global balance, the
                    mutual-information loss, pathway masks)
  sparse_specific_example_norm
                    the same with every sample's loss weighted alike (`train.loss_norm: example`):
                    what CONFIG's own loss normalisation buys (run it when CONFIG uses another)

Each (variant, seed) is its own run directory under DIR (default runs/ablate-NAME); a rerun
continues where it stopped. The table (printed, ablation.md and ablation.json in DIR) gives each
task's metric per variant as mean and spread over seeds, I(task; expert) per MoE layer as a
share of its maximum, the experts each task's export keeps, and training time.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from pathways_mm.config import ExperimentConfig, MoEConfig
from pathways_mm.data.taskset import load_tasks, make_sampler
from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_write_text
from pathways_mm.metrics import LOWER_IS_BETTER
from pathways_mm.routes_file import load as load_routes
from pathways_mm.studies.baseline import baseline_config, dense_counterpart
from pathways_mm.studies.common import final_eval, primary, records, run_stage, spread, train_stage, trained
from pathways_mm.viz import views

VARIANTS = ("single_dense", "multi_dense", "sparse_tokens", "sparse_pathways", "sparse_specific")
EXTRA = ("sparse_specific_example_norm",)  # run only when asked for with --variant
SPARSE = (*VARIANTS[2:], *EXTRA)


def variant_config(cfg: ExperimentConfig, variant: str, seed: int) -> ExperimentConfig:
    """CONFIG as one variant of the ablation (multi-task variants; single_dense: see `baseline_config`)."""
    cfg = cfg.replace(name=f"{cfg.name}-{variant}-s{seed}", seed=seed)
    moe = cfg.model.moe
    if variant == "multi_dense":
        return cfg.replace(model=dense_counterpart(cfg.model), eval=dataclasses.replace(cfg.eval, routes=False))
    base = dict(mi_coef=0.0, mask_mass=0.0)
    routing = {
        "sparse_tokens": dict(base, balance="global", task_prior=False),
        "sparse_pathways": dict(base, balance="per_task", task_prior=True),
    }.get(variant, {})
    if variant == "sparse_specific_example_norm":
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, loss_norm="example"))
    model = dataclasses.replace(cfg.model, moe=dataclasses.replace(moe, **routing))
    return cfg.replace(model=model, eval=dataclasses.replace(cfg.eval, routes=True))


def _check(cfg: ExperimentConfig, seeds: int, variants: tuple[str, ...]) -> None:
    if not cfg.model.moe.num_experts:
        raise ConfigError(f"{cfg.source}: the ablation compares sparse variants; set model.moe.num_experts > 0")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    unknown = [v for v in variants if v not in VARIANTS + EXTRA]
    if unknown:
        raise ConfigError(f"--variant {unknown[0]}: not one of {', '.join(VARIANTS + EXTRA)}")
    dense_counterpart(cfg.model)  # raises if no dense width matches the active parameters


def run_ablation(cfg: ExperimentConfig, seeds: int, out: Path, variants: tuple[str, ...] = VARIANTS, say=print):
    """Train, evaluate and export every (variant, seed) not done yet; write and return the table."""
    variants = variants or VARIANTS
    _check(cfg, seeds, variants)
    out.mkdir(parents=True, exist_ok=True)
    ts = load_tasks(cfg)
    shares = {t.name: float(p) for t, p in zip(ts.tasks, make_sampler(cfg, ts).probs)}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for seed in range(seeds):
        for variant in variants:
            run_dir = out / variant / f"seed{seed}"
            say(f"ablate: {variant}, seed {seed}")
            if variant == "single_dense":
                runs[variant].append(_single_dense(cfg, seed, shares, run_dir, say))
            else:
                runs[variant].append(_multi(cfg, variant, seed, run_dir, say))
    result = summarize(cfg, seeds, runs)
    atomic_write_text(out / "ablation.json", json.dumps(result, indent=2))
    atomic_write_text(out / "ablation.md", format_markdown(result))
    say(format_markdown(result))
    say(f"ablate: wrote {out / 'ablation.md'} and {out / 'ablation.json'}")
    return result


def _timed_train(cfg: ExperimentConfig, run_dir: Path, say) -> float:
    """Train (unless done) and return the training time the run logged (seconds, last log step)."""
    started = time.time()
    done_before = trained(run_dir)
    train_stage(cfg, run_dir, say)
    logged = [r["elapsed_s"] for r in records(run_dir) if "elapsed_s" in r]
    return logged[-1] if logged else (0.0 if done_before else time.time() - started)


def _single_dense(cfg: ExperimentConfig, seed: int, shares: dict[str, float], run_dir: Path, say) -> dict[str, Any]:
    metrics, seconds = {}, 0.0
    for task in cfg.tasks:
        bcfg = baseline_config(cfg.replace(seed=seed), task, shares[task], run_dir)
        bcfg = bcfg.replace(eval=dataclasses.replace(bcfg.eval, routes=False))
        seconds += _timed_train(bcfg, run_dir / task, say)
        metrics[task] = final_eval(run_dir / task)[task]
    return {"metrics": metrics, "train_s": seconds}


def _multi(cfg: ExperimentConfig, variant: str, seed: int, run_dir: Path, say) -> dict[str, Any]:
    vcfg = variant_config(cfg, variant, seed)
    seconds = _timed_train(vcfg, run_dir, say)
    result = {"metrics": final_eval(run_dir), "train_s": seconds}
    if variant in SPARSE:
        routes = sorted((run_dir / "routes").glob("step_*.json"))[-1]
        result["routes"] = route_summary(load_routes(routes))
        result["export"] = {t: _export(run_dir, t, vcfg, say) for t in cfg.tasks}
    return result


def _export(run_dir: Path, task: str, cfg: ExperimentConfig, say) -> dict[str, Any]:
    """`pathways-mm export` of one task (unless done): experts kept per layer, parameters, parity."""
    out = run_dir.parent / f"{run_dir.name}-export" / task
    info = out / "export.json"
    if not info.is_file():
        say(f"ablate: export {task} from {run_dir}")
        samples = str(cfg.eval.max_samples)
        run_stage(["export", "--from", str(run_dir), "--task", task, "--out", str(out), "--max-samples", samples],
                  out.with_name(f"{task}.log"))  # fmt: skip
    e = json.loads(info.read_text())
    per_layer = [len(ids) for ids in e["kept_experts"].values()]
    return {"experts_kept": per_layer, "params_export": e["params_export"], "params_full": e["params_full"]}


def route_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """Per MoE layer: I(task; expert) and its maximum (bits), the least-used expert's load / fair share."""
    layers = []
    for layer in doc["layers"]:
        joint_TE = views.task_expert_joint(layer)
        layers.append({
            "block": layer["block"],
            "mi_task": views.mutual_information(joint_TE),
            "mi_task_max": views.mutual_information_max(joint_TE),
            "min_expert_load": float(views.expert_load(joint_TE).min()),
        })  # fmt: skip
    return {"layers": layers}


def summarize(cfg: ExperimentConfig, seeds: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and spread over seeds of every number the table shows."""
    table: dict[str, Any] = {}
    for variant, per_seed in runs.items():
        row: dict[str, Any] = {"train_s": spread([r["train_s"] for r in per_seed]), "tasks": {}}
        for task in cfg.tasks:
            m = primary(task)
            row["tasks"][task] = {m: spread([r["metrics"][task][m] for r in per_seed])}
        if variant in SPARSE:
            n_layers = len(per_seed[0]["routes"]["layers"])
            mi = [[r["routes"]["layers"][i]["mi_task"] / max(r["routes"]["layers"][i]["mi_task_max"], 1e-12)
                   for r in per_seed] for i in range(n_layers)]  # fmt: skip
            row["mi_share"] = [spread(v) for v in mi]
            row["min_expert_load"] = [spread([r["routes"]["layers"][i]["min_expert_load"] for r in per_seed])
                                      for i in range(n_layers)]  # fmt: skip
            row["experts_kept"] = {t: [spread([r["export"][t]["experts_kept"][i] for r in per_seed])
                                       for i in range(n_layers)] for t in cfg.tasks}  # fmt: skip
        table[variant] = row
    moe: MoEConfig = cfg.model.moe
    return {"config": str(cfg.source), "name": cfg.name, "seeds": seeds, "steps": cfg.train.steps,
            "experts": moe.num_experts, "top_k": moe.top_k, "tasks": list(cfg.tasks), "variants": table}  # fmt: skip


def _cell(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def format_markdown(result: dict[str, Any]) -> str:
    variants = list(result["variants"])
    head = f"| task | metric | {' | '.join(variants)} |"
    lines = [f"{result['seeds']} seeds, {result['steps']} steps each; mean ± standard deviation over seeds.", "",
             head, "|---|---|" + "---:|" * len(variants)]  # fmt: skip
    for task in result["tasks"]:
        m = primary(task)
        cells = [_cell(result["variants"][v]["tasks"][task][m]) for v in variants]
        lines.append(f"| {task} | {m}{' (lower is better)' if m in LOWER_IS_BETTER else ''} | {' | '.join(cells)} |")
    lines.append(f"| training time | s | {' | '.join(_cell(result['variants'][v]['train_s'], 0) for v in variants)} |")
    sparse = [v for v in variants if "mi_share" in result["variants"][v]]
    if sparse:
        lines += ["", "Routing (test split): I(task; expert) as a share of its maximum per MoE layer, the least-used "
                  "expert's load / fair share, and the experts each task's export keeps per layer.", "",
                  f"| | {' | '.join(sparse)} |", "|---|" + "---:|" * len(sparse)]  # fmt: skip
        n_layers = len(result["variants"][sparse[0]]["mi_share"])
        for i in range(n_layers):
            lines.append(f"| I(task; expert) / max, MoE layer {i + 1} | "
                         f"{' | '.join(_cell(result['variants'][v]['mi_share'][i], 2) for v in sparse)} |")  # fmt: skip
            lines.append(f"| min expert load, MoE layer {i + 1} | "
                         f"{' | '.join(_cell(result['variants'][v]['min_expert_load'][i], 2) for v in sparse)} |")  # fmt: skip
        for task in result["tasks"]:
            cells = [
                " / ".join(f"{s['mean']:.1f}" for s in result["variants"][v]["experts_kept"][task]) for v in sparse
            ]
            lines.append(
                f"| experts kept by {task}'s export (per layer, of {result['experts']}) | {' | '.join(cells)} |"
            )
    return "\n".join(lines) + "\n"
