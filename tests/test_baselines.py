"""Baselines, the cross-expert metric, the calibration and the experiment runner, on the synthetic set."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch

from expertpool import baselines, build, experiment
from expertpool.baselines import Context, Schedules, run_method
from expertpool.build import recipe
from expertpool.calibrate import CalibratedModel, fit_arbitration, fit_calibration
from expertpool.cli import main
from expertpool.data import load as load_data
from expertpool.evaluate import cross_expert_ratio
from expertpool.pool import Pool
from expertpool.train import Runtime, TrainConfig

FAST = TrainConfig(4, 0.05, (3,), batch_size=128)  # heads on cached features
FRONT = TrainConfig(8, 0.05, (6,), batch_size=64)  # fronts + heads from scratch


# --------------------------------------------------------------------------- the metric
def test_cross_expert_error_counted_exactly_when_argmax_is_in_another_task():
    # two experts: classes 0,1 (task A) and 2,3,4 (task B)
    logits = torch.tensor([
        [5.0, 1.0, 0.0, 0.0, 0.0],  # label 0, predicted 0: right
        [1.0, 5.0, 0.0, 0.0, 0.0],  # label 0, predicted 1: wrong, same task
        [0.0, 0.0, 0.0, 9.0, 0.0],  # label 1, predicted 3: wrong, other task (cross)
        [0.0, 0.0, 1.0, 0.0, 7.0],  # label 2, predicted 4: wrong, same task
        [3.0, 0.0, 1.0, 0.0, 0.0],  # label 3, predicted 0: wrong, other task (cross)
        [0.0, 0.0, 0.0, 0.0, 2.0],  # label 4, predicted 4: right
    ])
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    r = cross_expert_ratio(logits, labels, [2, 3])
    assert r == {"errors": 4, "cross_expert_errors": 2, "cross_expert_ratio": 50.0}
    assert cross_expert_ratio(logits[[0, 5]], labels[[0, 5]], [2, 3])["cross_expert_ratio"] == 0.0


# --------------------------------------------------------------------------- calibration
def test_arbitration_fit_recovers_scale_and_bias():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4000, 3, generator=g) * 2
    true_a, true_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.3, -0.6, 0.3])
    targets = (scores * true_a + true_b).softmax(1)
    a, b = fit_arbitration(scores, targets)
    assert torch.allclose(torch.tensor(a), true_a, atol=0.05)
    assert torch.allclose(torch.tensor(b), true_b - true_b.mean(), atol=0.05)


def test_calibrated_model_keeps_each_experts_argmax(tiny_pool_path):
    model = Pool(tiny_pool_path).compose(["alpha", "beta"])
    cal = CalibratedModel(model, [(2.0, -1.0), (0.5, 3.0)])
    x = torch.randn(8, 3, 16, 16)
    raw, out = model(x), cal(x)
    assert torch.equal(raw[:, :3].argmax(1), out[:, :3].argmax(1))
    assert torch.allclose(out[:, 3:], raw[:, 3:] * 0.5 + 3.0)
    assert cal.labels == model.labels and cal.group_sizes == [3, 3]


# --------------------------------------------------------------------------- every baseline
@pytest.fixture(scope="module")
def ctx(tiny_pool_path):
    rec = recipe("synthetic", "tiny")
    rt = Runtime(torch.device("cpu"), False, False)
    c = Context(Pool(tiny_pool_path), load_data("synthetic"), rec, Schedules(FAST, FRONT), rt, rt, seed=0)
    views = c.views
    experts = {t: c.pool.expert(t) for t in c.pool.tasks}
    c.calibration = fit_calibration(experts, {t: c.hierarchy.task_classes(t) for t in experts}, views.features,
                                    views.oracle_logits, rt)
    return c


@pytest.mark.parametrize("method", baselines.METHODS)
def test_each_method_builds_and_scores_above_chance(ctx, method):
    tasks = ["alpha", "gamma"]  # 6 classes: chance is 16.7 %
    r = run_method(ctx, method, tasks)
    assert r["accuracy"] > 60, r
    assert r["test_images"] == 600 and r["params"] > 0 and r["flops"] > 0 and r["build_seconds"] >= 0
    if method in baselines.HEAD_METHODS + baselines.FRONT_METHODS:
        assert r["epochs"] == (FAST if method in baselines.HEAD_METHODS else FRONT).epochs and r["build_seconds"] > 0
    if method in ("poe", "poe_calibrated"):
        assert r["build_seconds"] < 5


def test_head_width_is_a_quarter_of_n(ctx):
    for n in (1, 2, 3):
        head = baselines.head_for(ctx, ctx.pool.tasks[:n], 32)
        assert head.fc.in_features == 16 * n and head.fc.out_features == 3 * n


# --------------------------------------------------------------------------- the runner
def test_runner_writes_tables_and_resumes_without_training(tiny_pool_copy, tmp_path, monkeypatch):
    def small_recipe(dataset, preset):
        return replace(build.recipe(dataset, preset), expert_train=TrainConfig(2, 0.05, (1,), batch_size=128))

    monkeypatch.setattr(experiment, "recipe", small_recipe)
    out = tmp_path / "results"
    args = ["experiment", "--dataset", "synthetic", "--preset", "tiny", "--pool", str(tiny_pool_copy),
            "--out", str(out), "--max-queries", "1", "--max-tasks", "2", "--methods", "oracle", "poe",
            "poe_calibrated", "transfer", "--no-progress"]
    assert main(args) == 0
    with open(out / "methods.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "n_tasks", "queries", "accuracy_mean", "accuracy_std", "build_seconds_mean",
                             "params", "flops"]
    assert {(r["method"], r["n_tasks"]) for r in rows} == {(m, n) for m in ("oracle", "poe", "poe_calibrated",
                                                                            "transfer") for n in ("1", "2")}
    assert all(r["queries"] == "1" for r in rows)
    with open(out / "cross_expert.csv") as f:
        cross = list(csv.DictReader(f))
    assert list(cross[0]) == ["variant", "n_tasks", "cross_expert_ratio"]
    assert {r["variant"] for r in cross} >= {"soft", "scale", "both"} and {r["n_tasks"] for r in cross} == {"2"}
    for name in ("summary.md", "accuracy_vs_n.png", "build_time.png", "queries.csv"):
        assert (out / name).stat().st_size > 0
    assert "Oracle accuracy" in (out / "summary.md").read_text()
    cells = (out / "work" / "cells.jsonl").read_text().splitlines()
    assert len(cells) == 4 * 2 + 2  # 4 methods x 2 queries, soft + scale at n(Q)=2

    # a second run reuses every cell: no training, no feature cache, same tables
    def boom(*a, **k):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr(baselines, "fit", boom)
    monkeypatch.setattr(build, "fit", boom)
    monkeypatch.setattr(baselines.FeatureViews, "compute", boom)
    before = (out / "methods.csv").read_text(), (out / "cross_expert.csv").read_text()
    assert main(args) == 0
    assert ((out / "methods.csv").read_text(), (out / "cross_expert.csv").read_text()) == before
    assert (out / "work" / "cells.jsonl").read_text().splitlines() == cells
    assert json.loads(cells[0])["key"].startswith("oracle|")


def test_queries_are_sampled_per_n_with_the_seed():
    tasks = ["a", "b", "c", "d", "e"]
    assert len(experiment.queries(tasks, 5, None, 0)) == 31
    qs = experiment.queries(tasks, 5, 3, 0)
    assert [len(q) for q in qs] == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3 + [5]
    assert qs == experiment.queries(tasks, 5, 3, 0) and qs != experiment.queries(tasks, 5, 3, 1)


def test_runner_redoes_only_the_cells_of_a_changed_expert(tiny_pool_copy, tmp_path, monkeypatch):
    from expertpool.store import Store, expert_name

    out = tmp_path / "results"
    args = ["experiment", "--dataset", "synthetic", "--preset", "tiny", "--pool", str(tiny_pool_copy),
            "--out", str(out), "--max-queries", "1", "--max-tasks", "2", "--methods", "oracle", "poe", "uhc",
            "--no-ablation", "--no-progress"]
    monkeypatch.setattr(experiment, "schedules", lambda preset, rec: Schedules(FAST, TrainConfig(1, batch_size=256)))
    assert main(args) == 0
    first = [json.loads(line) for line in (out / "work" / "cells.jsonl").read_text().splitlines()]
    changed = first[0]["tasks"][0]  # the task of the n(Q)=1 query
    store = Store(tiny_pool_copy)
    c = store.get(expert_name(changed))
    expert = c.build()
    with torch.no_grad():
        expert.fc.bias += 1.0
    store.put(c.name, "expert", expert, c.meta, c.metrics, task=changed)
    store.close()
    calls = []
    real_fit = baselines.fit
    monkeypatch.setattr(baselines, "fit", lambda *a, **k: calls.append(a[6]) or real_fit(*a, **k))
    assert main(args) == 0
    redone = [json.loads(line) for line in (out / "work" / "cells.jsonl").read_text().splitlines()][len(first):]
    expected = {(c["method"], tuple(c["tasks"])) for c in first if c["method"] != "oracle" and changed in c["tasks"]}
    assert {(c["method"], tuple(c["tasks"])) for c in redone} == expected
    assert len(calls) == sum(1 for m, _ in expected if m == "uhc")
