"""End to end on the tiny synthetic pool: build (CLI), tasks, query, exact consolidation, bad input."""

import json
import subprocess
import sys

import pytest
import torch

import expertpool
from expertpool.cli import main
from expertpool.evaluate import count_params


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "expertpool.cli", *args], capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout, r.stderr


def test_tasks_json(tiny_pool_path, capsys):
    assert main(["tasks", "--pool", str(tiny_pool_path), "--json"]) == 0
    tasks = json.loads(capsys.readouterr().out)["tasks"]
    assert [t["name"] for t in tasks] == ["alpha", "beta", "gamma", "delta"]
    assert tasks[1]["classes"] == ["beta_0", "beta_1", "beta_2"]


def test_query_two_tasks_json(tiny_pool_path, capsys):
    assert main(["query", "--pool", str(tiny_pool_path), "--tasks", "gamma", "alpha", "--eval", "--json"]) == 0
    ans = json.loads(capsys.readouterr().out)
    assert ans["tasks"] == ["gamma", "alpha"]
    assert ans["labels"] == ["gamma_0", "gamma_1", "gamma_2", "alpha_0", "alpha_1", "alpha_2"]
    pool = expertpool.open_pool(tiny_pool_path)
    assert ans["params"] == count_params(pool.library()) + count_params(pool.expert("gamma")) + count_params(pool.expert("alpha"))
    assert ans["flops"] > 0 and ans["build_ms"] >= 0
    assert ans["accuracy"] > 80.0  # chance is 16.7 %
    assert set(ans) >= {"tasks", "labels", "params", "flops", "build_ms", "accuracy"}


def test_query_without_eval_has_null_accuracy(tiny_pool_path, capsys):
    assert main(["query", "--pool", str(tiny_pool_path), "--tasks", "beta", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] is None


def test_consolidation_is_exact(tiny_pool_path):
    pool = expertpool.open_pool(tiny_pool_path)
    assert pool.input_shape == (3, 16, 16)
    x = torch.randn(7, *pool.input_shape)
    ab = pool.compose(["alpha", "delta"])
    with torch.no_grad():
        side_by_side = torch.cat([pool.compose(["alpha"])(x), pool.compose(["delta"])(x)], dim=1)
        assert torch.equal(ab(x), side_by_side)
        f = pool.library()(x)
        assert torch.equal(ab(x), torch.cat([pool.expert("alpha")(f), pool.expert("delta")(f)], dim=1))
    assert ab.label_groups == {"alpha": ["alpha_0", "alpha_1", "alpha_2"], "delta": ["delta_0", "delta_1", "delta_2"]}
    assert ab.class_ids == [0, 1, 2, 9, 10, 11]
    assert not ab.training
    top = ab.predict(x[:2], k=2)
    assert len(top) == 2 and len(top[0]) == 2 and top[0][0][1] >= top[0][1][1]


def test_experts_are_in_a_module_list(tiny_pool_path):
    model = expertpool.open_pool(tiny_pool_path).compose(["alpha", "beta", "gamma"])
    assert isinstance(model.experts, torch.nn.ModuleList) and len(model.experts) == 3
    assert len([k for k in model.state_dict() if k.startswith("experts.2.")]) > 0


def test_build_metrics_are_kept(tiny_pool_path, capsys):
    assert main(["pool", "info", "--pool", str(tiny_pool_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["oracle"]["metrics"]["accuracy"] > 80
    assert info["library"]["metrics"]["student_accuracy"] > 80
    assert len(info["experts"]) == 4 and all(e["metrics"]["accuracy"] > 80 for e in info["experts"])


@pytest.mark.parametrize("args, message", [
    (["--tasks", "alpha", "nope"], "unknown task 'nope'; valid tasks: alpha, beta, gamma, delta"),
    (["--tasks"], "empty query: name one or more tasks; valid tasks: alpha, beta, gamma, delta"),
    (["--tasks", "beta", "beta"], "duplicate task(s) in query: beta"),
])
def test_query_errors_are_one_line(tiny_pool_path, args, message):
    code, out, err = _cli("query", "--pool", str(tiny_pool_path), *args)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")


def test_missing_pool_and_missing_data(tmp_path):
    code, _, err = _cli("tasks", "--pool", str(tmp_path / "none.db"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    code, _, err = _cli("build", "--dataset", "fashion-mnist", "--data-root", str(tmp_path), "--pool",
                        str(tmp_path / "p.db"), "--preset", "tiny")
    assert code == 2 and "Fashion-MNIST file" in err and "Traceback" not in err


def test_resume_with_other_arguments_is_refused(tiny_pool_copy):
    code, _, err = _cli("build", "--dataset", "synthetic", "--preset", "tiny", "--seed", "5", "--pool", str(tiny_pool_copy))
    assert code == 2 and "started with other arguments (seed differ)" in err


def test_rebuild_is_a_no_op(tiny_pool_copy):
    before = expertpool.open_pool(tiny_pool_copy).store.summary("expert/beta")["sha256"]
    code, out, err = _cli("build", "--dataset", "synthetic", "--preset", "tiny", "--pool", str(tiny_pool_copy), "--no-progress")
    assert code == 0 and "all found in pool" in err
    assert expertpool.open_pool(tiny_pool_copy).store.summary("expert/beta")["sha256"] == before


def test_training_mode_of_one_composed_model_does_not_leak_into_the_next(tiny_pool_path):
    pool = expertpool.open_pool(tiny_pool_path)
    pool.compose(["alpha", "beta"]).train()  # its library and experts are the pool's cached ones
    again = pool.compose(["beta", "alpha"])
    assert not any(m.training for m in again.modules())
    x = torch.randn(4, *pool.input_shape)
    with torch.no_grad():
        assert torch.equal(again(x), again(x))  # eval-mode BatchNorm: no batch statistics


def test_an_open_pool_sees_tasks_removed_and_replaced_by_another_connection(tiny_pool_copy):
    from expertpool.build import remove_task
    from expertpool.errors import UserError
    from expertpool.store import Store, expert_name

    pool = expertpool.open_pool(tiny_pool_copy)
    x = torch.randn(3, *pool.input_shape)
    with torch.no_grad():
        before = pool.compose(["beta"])(x)
    assert "alpha" in pool.tasks
    remove_task(str(tiny_pool_copy), "alpha")  # its own connection, as another process would
    assert "alpha" not in pool.tasks
    with pytest.raises(UserError, match="alpha"):
        pool.compose(["alpha", "beta"])
    # beta's expert replaced in the file: the pool drops its cached copy and answers with the new weights
    writer = Store(tiny_pool_copy)
    old = writer.get(expert_name("beta"))
    changed = old.build()
    with torch.no_grad():
        changed.fc.bias.add_(1.0)
    writer.put(expert_name("beta"), "expert", changed, old.meta, old.metrics, task="beta")
    writer.close()
    with torch.no_grad():
        after = pool.compose(["beta"])(x)
    assert torch.allclose(after, before + 1.0, atol=1e-5)
    assert pool.expert_sha256("beta") != old.sha256


def test_composing_from_a_warm_pool_takes_well_under_a_millisecond(tiny_pool_path):
    """Issue 6's figure is measured by ``expertpool bench``; this only guards against a gross regression."""
    from expertpool.evaluate import timeit_ms

    pool = expertpool.open_pool(tiny_pool_path)
    pool.compose(pool.tasks)
    assert timeit_ms(lambda: pool.compose(pool.tasks), repeat=200)["p50"] < 1.0
