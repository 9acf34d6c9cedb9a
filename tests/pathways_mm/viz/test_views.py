"""Routes files and the numbers behind every figure, from routes files of known structure."""

import json

import numpy as np
import pytest

from pathways_mm import routes_file
from pathways_mm.config import ModelConfig, MoEConfig
from pathways_mm.errors import ConfigError
from pathways_mm.viz.draw import draw
from pathways_mm.viz.views import compare, main_experts, views
from tests.helpers import AFTER, BEFORE, ROUTES_CFG, ROUTES_E, TEXT, make_doc, run_cli


def test_document_keeps_the_configured_tasks_and_round_trips(tmp_path):
    doc = make_doc(BEFORE)
    assert doc["tasks"] == ["a", "b", "new"] and [layer["block"] for layer in doc["layers"]] == [1, 3]
    assert np.asarray(doc["layers"][0]["routes"]).shape == (3, 3, ROUTES_E)  # max_tasks rows cut to the task table
    assert doc["layers"][0]["entropy_sum"][0][TEXT] == pytest.approx(0.7 * 50)
    assert (
        doc["model"]["hash"]
        == routes_file.model_identity(
            ROUTES_CFG.replace(
                model=ModelConfig(n_layers=4, moe=MoEConfig(num_experts=ROUTES_E, impl="deepspeed", ep_size=2))
            )
        )["hash"]
    )
    assert routes_file.load(routes_file.write(tmp_path / "r.json", doc)) == doc


def test_model_hash_ignores_a_later_key_at_its_old_value():
    import dataclasses
    import hashlib

    from pathways_mm.config import MOE_RUNTIME_KEYS, to_dict

    model = to_dict(ROUTES_CFG.model)
    old_moe = {k: v for k, v in model["moe"].items() if k not in MOE_RUNTIME_KEYS and k != "shared_d_ff"}
    old = hashlib.sha256(json.dumps({**model, "moe": old_moe}, sort_keys=True).encode()).hexdigest()[:16]
    assert routes_file.model_identity(ROUTES_CFG)["hash"] == old  # as written before shared experts existed
    moe = dataclasses.replace(ROUTES_CFG.model.moe, shared_d_ff=8)
    shared = ROUTES_CFG.replace(model=dataclasses.replace(ROUTES_CFG.model, moe=moe))
    assert routes_file.model_identity(shared)["hash"] != old


def test_heatmap_modality_entropy_and_dropped_numbers():
    v = views(make_doc(BEFORE, dropped={1: {(0, TEXT, 0): 10}}))
    assert v.tasks == ["a", "b"]  # "new" has no tokens in this file
    l1, l3 = v.layers
    np.testing.assert_allclose(l1.share_TE, [[0.6, 0.2, 0.1, 0.1], [0.2, 0.2, 0.4, 0.2]])
    np.testing.assert_allclose(l3.share_TE, [[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0]])
    np.testing.assert_allclose(l1.modality_ME[:, 0], [0.75, 0.25, 0])  # expert 0: 60 text + 20 image routes
    np.testing.assert_allclose(l1.modality_ME[:, 2], [1, 0, 0])
    assert np.isnan(l3.modality_ME[:, 3]).all()  # no routes: no share to draw
    np.testing.assert_allclose(l1.entropy_T, [0.7, 0.7])
    np.testing.assert_allclose(l1.dropped_T, [0.1, 0.0])


def test_gate_usage_entropy_and_tokens_off_the_main_expert():
    old = views(make_doc(BEFORE))  # a routes file without top-1 counts (written before them) still loads
    assert np.isnan(old.layers[0].off_top_T).all()
    # usage entropy: the entropy of a task's routes over experts, nats (block 3, task a: 50/50 -> ln 2)
    np.testing.assert_allclose(old.layers[1].usage_entropy_T, [np.log(2), np.log(2)])
    doc = make_doc(BEFORE)
    top1 = np.zeros((3, 3, ROUTES_E), dtype=int)
    top1[0, TEXT] = [40, 0, 10, 0]  # task a: 50 tokens, its most-routed expert is 0 -> 10 of 50 off it
    top1[1, TEXT] = [0, 0, 30, 0]  # task b: most-routed expert 2 (40 routes) -> none off it
    doc["layers"][0]["top1"] = top1.tolist()
    v = views(doc)
    np.testing.assert_allclose(v.layers[0].off_top_T, [0.2, 0.0])
    assert np.isnan(v.layers[1].off_top_T).all()  # that layer has no top-1 counts


def test_pathways_shared_nodes_and_reuse():
    v = views(make_doc(BEFORE))
    assert v.pathways == {"a": [[0], [0]], "b": [[2, 0], [1]]}
    assert v.shared_nodes == {(0, 0): ["a", "b"]}
    # overlap = sum_e min(shares): block 1 0.2+0.2+0.1+0.1 = 0.6, block 3 0.5; mean 0.55
    np.testing.assert_allclose(v.reuse_TT, [[1, 0.55], [0.55, 1]])


@pytest.mark.parametrize(
    "share,mass,want",
    [
        ([0.7, 0.1, 0.1, 0.1], 0.5, [0]),
        ([0.3, 0.1, 0.4, 0.2], 0.5, [2, 0]),
        ([0.25] * 4, 0.9, [0, 1, 2, 3]),
        ([np.nan] * 4, 0.5, []),
    ],
)
def test_main_experts(share, mass, want):
    assert main_experts(np.asarray(share), mass) == want


def test_comparison_numbers():
    c = compare(make_doc(BEFORE), make_doc(AFTER))
    assert c.tasks == ["a", "b"] and c.added == ["new"] and c.removed == [] and c.blocks == [1, 3]
    np.testing.assert_allclose(c.delta_LTE[0], 0)
    np.testing.assert_allclose(c.delta_LTE[1], [[-0.5, -0.5, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_allclose(c.shift_TL, [[0, 1], [0, 0]])  # a moved to disjoint experts in block 3
    np.testing.assert_allclose(c.reuse_delta_TT, [[0, -0.25], [-0.25, 0]])  # block 3 overlap 0.5 -> 0


def _not_blank(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)[..., :3]
    colours = np.unique((img.reshape(-1, 3) * 255).astype(int), axis=0)
    return img.std() > 0.05 and len(colours) > 20


def test_draw_writes_every_figure(tmp_path):
    before, after = (
        routes_file.write(tmp_path / "before.json", make_doc(BEFORE)),
        routes_file.write(tmp_path / "after.json", make_doc(AFTER)),
    )
    paths = draw(after, tmp_path / "fig", compare=before)
    names = [p.name for p in paths]
    assert names == [
        "heatmap_block1.png",
        "heatmap_block3.png",
        "pathways.png",
        "reuse.png",
        "modality.png",
        "compare.png",
        "routes.html",
    ]
    for p in paths[:-1]:
        assert _not_blank(p), p
    page = paths[-1].read_text()
    assert all(f'id="view-{k}"' in page for k in ("heatmap", "pathways", "reuse", "modality", "compare"))
    assert "block 3, a -&gt; expert 3: share change +1.000" in page  # the number on hover
    assert "src=" not in page and "<link" not in page  # nothing to fetch: one self-contained file


def test_compare_refuses_other_layer_or_expert_counts(tmp_path):
    a = routes_file.write(tmp_path / "a.json", make_doc(BEFORE))
    b = routes_file.write(tmp_path / "b.json", make_doc({1: BEFORE[1]}))
    with pytest.raises(ConfigError, match="different MoE layers/experts"):
        draw(a, tmp_path / "out", compare=b)


def _tampered(edit):
    doc = json.loads(json.dumps(make_doc(BEFORE)))
    edit(doc)
    return doc


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["layers"][0].pop("block"), "a layer's 'block' must be an integer >= 0, got None"),
        (lambda d: d["layers"][1].update(block=1), "a block appears twice in [1, 1]"),
        (
            lambda d: d["layers"][0]["routes"][1][0].__setitem__(2, {"x": 1}),
            "block 1 routes[1][0][2] is {'x': 1}, not a count",
        ),
        (lambda d: d["layers"][0]["tokens"][0].__setitem__(0, -3), "block 1 tokens[0][0] is -3, not a count"),
        (
            lambda d: d["layers"][0]["routes"][2].append([0, 0, 0, 0]),
            "block 1 routes[2] has shape (4, 4), expected (3, 4)",
        ),
        (lambda d: d.update(tasks=[1, "b", "new"]), "tasks must be a list of distinct names, got [1, 'b', 'new']"),
        (lambda d: d.update(tasks=["a", "a", "new"]), "tasks must be a list of distinct names, got ['a', 'a', 'new']"),
        (lambda d: d.update(model=None), "no model section"),
        (
            lambda d: d["layers"][0].update(num_experts=True),
            "a layer's 'num_experts' must be an integer >= 1, got True",
        ),
    ],
)
def test_routes_files_that_pass_a_first_look_are_still_checked_cell_by_cell(edit, message, tmp_path):
    """What used to pass the loader and crash the drawing: every cell is checked before anything is drawn."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_tampered(edit)))
    with pytest.raises(ConfigError) as e:
        draw(path, tmp_path / "out")
    assert str(e.value) == f"{path}: not a valid routes file ({message})" and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "routes file not found"),
        ("not json {", "unreadable routes file (JSONDecodeError"),
        (json.dumps({"tasks": []}), 'not a routes file (no "format"'),
        ("other", "cannot compare"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(content, message, tmp_path, data_dir):
    good = routes_file.write(tmp_path / "good.json", make_doc(BEFORE))
    path = tmp_path / "bad.json"
    args = ["routes", path, "--out", tmp_path / "out"]
    if content == "other":
        routes_file.write(path, make_doc({3: BEFORE[3]}))
        args = ["routes", good, "--compare", path, "--out", tmp_path / "out"]
    elif content is not None:
        path.write_text(content)
    res = run_cli(args, data_dir)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pathways-mm: error: ") and message in lines[0], res.stderr


def test_cli_draws_a_routes_file(tmp_path, data_dir):
    good = routes_file.write(tmp_path / "good.json", make_doc(BEFORE))
    res = run_cli(["routes", good, "--out", tmp_path / "out"], data_dir)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "routes.html").is_file() and (tmp_path / "out" / "pathways.png").is_file()
