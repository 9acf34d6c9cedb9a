"""`pathways-mm add-task`: old tasks' outputs stay bit-identical, with and without new experts."""

import json

import pytest
import torch

from pathways_mm.config import config_from_dict, one_process
from pathways_mm.continual import surgery
from pathways_mm.continual.add_task import probe_batch
from pathways_mm.data.datasets import load_split
from pathways_mm.encoders.text import load_tokenizer
from pathways_mm.model.generate import target_logits
from pathways_mm.model.model import build_model
from pathways_mm.routing import pathways
from pathways_mm.runtime import checkpoint as ckpt
from pathways_mm.runtime.checkpoint import load_full_state
from pathways_mm.tasks import get_task
from tests.helpers import ROOT, deepspeed_launch, run_cli, sets

MOE_CFG = ROOT / "configs" / "experiments" / "moe_debug.yaml"
OLD = ("text_lm", "text_arith")
QUICK = [*sets("eval.max_samples=6", "train.log_every=1")]


def outputs(run_dir, data_dir, tasks=OLD) -> list[torch.Tensor]:
    """Teacher-forced logits of `tasks` (ids in table order) from a checkpoint, in this process (ep_size 1)."""
    tag = ckpt.resolve_checkpoint(run_dir)
    meta = ckpt.read_meta(tag)
    cfg = one_process(config_from_dict(meta["config"]))
    tok = load_tokenizer()
    model = build_model(cfg.model, tok.vocab_size)
    model.load_state_dict(load_full_state(tag))
    out = []
    for name in tasks:
        task = get_task(name)
        samples = list(load_split(task, "test", data_dir, cfg.data.seed)[:12])
        out.append(target_logits(model, probe_batch(task, meta["task_table"][name], samples, cfg, tok)))
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("addtask") / "base"
    res = run_cli(["train", MOE_CFG, *sets("train.steps=6"), *QUICK, *sets(f"train.out_dir={out}")], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, data_dir):
    """The base run with a shared expert (model.moe.shared_d_ff) beside the routed ones: trunk."""
    out = tmp_path_factory.mktemp("addtask") / "shared"
    args = [*sets("train.steps=6", "model.moe.shared_d_ff=48"), *QUICK, *sets(f"train.out_dir={out}")]
    res = run_cli(["train", MOE_CFG, *args], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _files(run_dir):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("grow,source", [(0, "base_run"), (2, "base_run"), (2, "shared_run")])
def test_old_tasks_bit_identical_after_add_task(grow, source, request, tmp_path, data_dir, monkeypatch):
    base_run = request.getfixturevalue(source)
    monkeypatch.setenv("PMM_DATA", str(data_dir))
    before_files = _files(base_run)
    out = tmp_path / f"plus{grow}"
    res = run_cli(
        [
            "add-task",
            "--from",
            base_run,
            "--task",
            "digit_image",
            "--grow-experts",
            grow,
            "--steps",
            4,
            "--out-dir",
            out,
            *(["--start-from", "text_lm"] if grow else []),
            *QUICK,
        ],
        data_dir,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert _files(base_run) == before_files  # the source checkpoint is untouched
    for a, b in zip(outputs(base_run, data_dir), outputs(out, data_dir), strict=True):
        assert torch.equal(a, b)
    report = json.loads((out / "add_task_report.json").read_text())
    assert report["old_outputs_bit_identical"] is True
    assert all(v["change"] == 0.0 for m in report["old_tasks"].values() for v in m.values())
    if grow:  # the pathway the user named, not the one the data fits best
        assert report["closest_task"] == "text_lm"
    meta = ckpt.read_meta(ckpt.resolve_checkpoint(out))
    assert meta["task_table"] == {"text_lm": 0, "text_arith": 1, "digit_image": 2}
    assert meta["pathways"]["digit_image"]["owns_experts"] == list(range(4, 4 + grow))
    assert meta["pathways"]["text_lm"]["frozen"] is True
    moe = meta["config"]["model"]["moe"]
    assert moe["num_experts"] == 4 + grow
    assert meta["config"]["model"]["adapter_tasks"] == [2] and report["adapter_rank"] == 16
    if grow:
        assert moe["expert_groups"] == {"base": 4, "digit_image": 2}
        assert 0.0 < report["reuse"]["share_on_old_experts"] < 1.0
    else:
        assert report["reuse"]["share_on_old_experts"] == 1.0  # no expert of its own: every route reuses
    assert report["params_added"] > 0 and report["trainable_elements"] >= report["params_added"]
    # The new run is an ordinary checkpoint: eval loads it with its grown layers.
    res = run_cli(["eval", out, "--max-samples", "4", "--out", tmp_path / "ev.json"], data_dir)
    assert res.returncode == 0 and "digit_image" in res.stdout, res.stderr[-2000:]
    if grow:  # export keeps a task's own adapter slot only, and its outputs stay the full model's
        from pathways_mm.inference.export import load_export

        for task, slots in (("digit_image", [2]), ("text_arith", [])):
            res = run_cli(
                ["export", "--from", out, "--task", task, "--out", tmp_path / task, "--max-samples", "6"], data_dir
            )
            assert res.returncode == 0, res.stderr[-3000:]
            sub, info = load_export(tmp_path / task)
            assert info["config"]["model"]["adapter_tasks"] == slots and info["parity"]["logits_bit_identical"]
            if source == "shared_run":  # the shared expert is trunk: every export keeps it whole
                assert info["config"]["model"]["moe"]["shared_d_ff"] == 48
                assert all(layer.shared.w1.weight.shape == (48, 64) for _, layer in pathways.moe_layers(sub))
            assert info["params_export"] < info["params_full"]
            if task == "text_arith":  # an old task never reaches the experts grown for digit_image
                assert all(max(ids) < 4 for ids in info["kept_experts"].values())


@pytest.mark.slow
def test_a_killed_add_task_resumes_to_the_uninterrupted_result(base_run, tmp_path, data_dir):
    """SIGKILL in step 5 (checkpoint at step 4), then --resume: the weights of a run never stopped,
    and the old tasks still bit-identical."""
    args = ["add-task", "--from", base_run, "--task", "digit_image", "--grow-experts", "2", "--steps", "6", *QUICK]
    args += sets("train.save_every=2")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli([*args, "--out-dir", whole], data_dir).returncode == 0
    res = run_cli([*args, "--out-dir", killed], data_dir, env_extra={"PMM_FAULT": "kill:rank=0:step=5"})
    assert res.returncode == -9 and not (killed / "add_task_report.json").exists()
    assert ckpt.resolve_checkpoint(killed).name == "step_0000004"
    res = run_cli([*args, "--out-dir", killed], data_dir)  # without --resume: refused, nothing touched
    assert res.returncode == 2 and "continue it with --resume" in res.stderr, res.stderr[-2000:]
    res = run_cli([*args, "--out-dir", killed, "--resume"], data_dir)
    assert res.returncode == 0 and "steps 4->6" in res.stderr, res.stderr[-3000:]  # continued, not restarted
    a, b = (load_full_state(ckpt.resolve_checkpoint(d)) for d in (whole, killed))
    at4 = load_full_state(killed / "checkpoints" / "step_0000004")
    assert a.keys() == b.keys() and any(not torch.equal(b[k], at4[k]) for k in b)  # steps 5-6 did train
    # the same batches and optimizer state; the same weights up to float summation order
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)
    report = json.loads((killed / "add_task_report.json").read_text())
    assert report["old_outputs_bit_identical"] is True and report["steps"] == 6
    for x, y in zip(outputs(base_run, data_dir), outputs(killed, data_dir), strict=True):
        assert torch.equal(x, y)


def test_grown_state_keeps_old_rows_and_masks_new_experts():
    full = {"decoder.task_embed.weight": torch.randn(4, 8)}
    layer = "decoder.blocks.1.ffn"
    full[f"{layer}.deepspeed_moe.gate.wg.weight"] = torch.randn(4, 8)
    full[f"{layer}.deepspeed_moe.gate.pathway"] = torch.randn(4, 4)
    full[f"{layer}.deepspeed_moe.gate.allowed"] = torch.ones(4, 4, dtype=torch.bool)
    for e in range(4):
        for n in ("w1", "w2", "w3"):
            full[pathways.expert_key(layer, e, n)] = torch.randn(6, 8)
    new, growth = surgery.grow(full, [layer], 4, 2, task_id=2, closest=1, seed_experts={layer: [3, 0, 1, 2]})
    assert growth.new_experts == [4, 5] and growth.copied_from == {layer: [3, 0]}
    allowed = new[f"{layer}.deepspeed_moe.gate.allowed"]
    assert allowed[:, 4:].tolist() == [[False] * 2, [False] * 2, [True] * 2, [False] * 2]  # only the new task
    assert torch.equal(new[f"{layer}.deepspeed_moe.gate.wg.weight"][:4], full[f"{layer}.deepspeed_moe.gate.wg.weight"])
    assert torch.equal(new[pathways.expert_key(layer, 4, "w1")], full[pathways.expert_key(layer, 3, "w1")])
    prior = new[f"{layer}.deepspeed_moe.gate.pathway"]
    assert torch.equal(prior[2, :4], full[f"{layer}.deepspeed_moe.gate.pathway"][1])
    assert torch.equal(new["decoder.task_embed.weight"][2], full["decoder.task_embed.weight"][1])


def _with_meta(run_dir, tmp_path, edit):
    """A copy of `run_dir` whose checkpoint metadata `edit` changed (republished, so it verifies)."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(run_dir, copy)
    tag = ckpt.resolve_checkpoint(copy)
    meta = json.loads((tag / ckpt.META_FILE).read_text())
    edit(meta)
    (tag / ckpt.META_FILE).write_text(json.dumps(meta))
    ckpt.publish(tag, meta["step"], ckpt.hash_files(tag, ckpt.list_files(tag)))
    return copy


@pytest.mark.parametrize(
    "case,message",
    [
        ("unknown", "unknown task 'no_such_task'"),
        ("exists", "task 'text_arith' already exists"),
        ("divisible", "--grow-experts 1: 4 + 1 experts do not split over ep_size=2"),
        ("size", "model differs from the checkpoint's in model.d_ff, model.d_model"),
        ("start", "--start-from digit_speech: not a task of"),
    ],
)
def test_bad_requests_are_one_line_errors_and_touch_nothing(case, message, base_run, tmp_path, data_dir):
    src, args = base_run, ["--task", "digit_image"]
    if case == "unknown":
        args = ["--task", "no_such_task"]
    elif case == "exists":
        args = ["--task", "text_arith"]
    elif case == "divisible":
        src = _with_meta(base_run, tmp_path, lambda m: m["config"]["model"]["moe"].update(ep_size=2))
        args += ["--grow-experts", "1"]
    elif case == "size":
        args += ["--config", MOE_CFG, *sets("model.size=tiny")]
    elif case == "start":
        args += ["--start-from", "digit_speech"]
    before = _files(src)
    res = run_cli(["add-task", "--from", src, *args, "--out-dir", tmp_path / "new"], data_dir)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("pathways-mm: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert _files(src) == before and not (tmp_path / "new").exists()


EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("imported because a checkpoint named it")
"""


@pytest.mark.slow
def test_add_task_never_imports_a_plugin_a_checkpoint_names(base_run, tmp_path, data_dir):
    """The issue's reproduction: pmm_meta.json's config.plugins rewritten to a module that writes a file,
    the manifest's checksums recomputed, that module shipped next to the checkpoint, `add-task --from`
    launched from there with `python -m` (the current directory on the import path)."""
    marker = tmp_path / "PWNED"
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    (downloaded / "pmm_evil_plugin.py").write_text(EVIL.format(marker=str(marker)))
    src = _with_meta(base_run, downloaded, lambda m: m["config"].update(plugins=["pmm_evil_plugin"]))
    out = tmp_path / "plus"
    res = run_cli(
        ["add-task", "--from", src, "--task", "digit_image", "--steps", 1, "--out-dir", out, *QUICK],
        data_dir,
        cwd=downloaded,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert not marker.exists()
    assert ckpt.read_meta(ckpt.resolve_checkpoint(out))["config"]["plugins"] == []  # not carried forward either
    res = run_cli(["eval", src, "--max-samples", "2", "--out", tmp_path / "e.json"], data_dir, cwd=downloaded)
    assert res.returncode == 0 and not marker.exists(), res.stderr[-3000:]


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory, data_dir):
    base = tmp_path_factory.mktemp("addtask_ep2") / "ep2"
    res = deepspeed_launch(
        2,
        [
            "train",
            MOE_CFG,
            *sets("model.moe.ep_size=2", "train.steps=4"),
            *QUICK,
            *sets(f"train.out_dir={base}"),
        ],
        data_dir,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return base


@pytest.mark.distributed
@pytest.mark.parametrize("grow", [0, 2])
def test_add_task_over_two_processes_with_expert_parallelism(grow, ep2_run, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("PMM_DATA", str(data_dir))
    base, out = ep2_run, tmp_path / "ep2+digit_image"
    res = deepspeed_launch(
        2,
        [
            "add-task",
            "--from",
            base,
            "--task",
            "digit_image",
            "--grow-experts",
            grow,
            "--steps",
            "3",
            "--out-dir",
            out,
            *(["--start-from", "text_lm"] if grow else []),
            *QUICK,
        ],
        data_dir,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # 4 + grow experts over 2 ranks, one file per global expert (with grow 2, old expert 2 moves from rank 1 to rank 0)
    assert sorted(p.name for p in (out / "checkpoints" / "step_0000003").glob("layer_0_expert_*")) == sorted(
        f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4 + grow)
    )
    report = json.loads((out / "add_task_report.json").read_text())
    assert report["old_outputs_bit_identical"] is True
    for a, b in zip(outputs(base, data_dir), outputs(out, data_dir), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_export_gives_the_full_models_outputs_with_fewer_parameters(base_run, tmp_path, data_dir, monkeypatch):
    from pathways_mm.inference.export import load_export

    monkeypatch.setenv("PMM_DATA", str(data_dir))
    out = tmp_path / "arith"
    args = ["export", "--from", base_run, "--task", "text_arith", "--out", out, "--max-samples", "12"]
    res = run_cli([*args, "--time-generation", "2"], data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    sub, info = load_export(out)
    assert info["parity"]["logits_bit_identical"] and info["parity"]["generations_equal"]
    assert sum(p.numel() for p in sub.parameters()) == info["params_export"] < info["params_full"]
    assert info["dropped_encoders"] == ["vision", "audio"]
    gen = info["generation"]  # --time-generation: both models timed on the same 12 samples
    assert gen["samples"] == 12 and gen["rounds"] == 2 and gen["full_ms_per_sample"] > 0 < gen["export_ms_per_sample"]
    assert "greedy generation (12 samples, median of 2 rounds" in res.stderr
    res = run_cli(["export", "--from", base_run, "--out", tmp_path / "whole", "--time-generation", "1"], data_dir)
    assert res.returncode == 2 and "give --task" in res.stderr
    cfg = config_from_dict(info["config"])
    task, tok = get_task("text_arith"), load_tokenizer()
    batch = probe_batch(task, info["task_id"], list(load_split(task, "test", data_dir, cfg.data.seed)[:12]), cfg, tok)
    assert torch.equal(target_logits(sub, batch), outputs(base_run, data_dir, tasks=("text_arith",))[0])
    res = run_cli(["export", "--from", base_run, "--task", "digit_image", "--out", tmp_path / "x"], data_dir)
    assert res.returncode == 2 and "task 'digit_image' is not in" in res.stderr, res.stderr[-2000:]
