"""The bench command's plumbing (its figures are measured by `expertpool bench`, not asserted here)."""

from __future__ import annotations

import torch

import expertpool
from expertpool.bench import (README_END, README_START, bench_compose, bench_export, bench_fused, fill_readme,
                              goals_table, make_bench_pool)
from expertpool.cli import main

RESULT = {"machine": "test machine", "compose_ms_p50": 0.2, "compose_cold_ms_p50": 25.0, "export_onnx_ms_p50": 30.0,
          "fused_speedup": 1.6, "extraction_speedup": 9.9}


def test_goals_table_says_which_goals_are_met():
    rows = {line.split("|")[1].strip(): line for line in goals_table(RESULT).splitlines()[2:]}
    assert len(rows) == 5
    assert rows["compose n(Q) = 5 from a warm pool, p50 (ms)"].endswith("| met |")
    assert "**missed**" in rows["compose n(Q) = 5 from the store, cold, p50 (ms)"]
    assert rows["fused / plain throughput, batch 256, n(Q) = 5"].endswith("| met |")
    assert "**missed**" in rows["wall time per expert, straightforward / cached + joint"]


def test_readme_block_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{README_START}\nold table\n{README_END}\nafter\n")
    fill_readme(str(readme), RESULT, "expertpool bench --quick")
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{README_END}\nafter\n")
    assert "old table" not in text and "`expertpool bench --quick` on test machine" in text
    fill_readme(str(readme), {**RESULT, "fused_speedup": 1.2}, "again")  # idempotent: one block, refreshed
    assert readme.read_text().count(README_START) == 1 and "| 1.2 |" in readme.read_text()


def test_bench_refuses_a_readme_without_markers_before_measuring(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    assert main(["bench", "--quick", "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "markers" in err and len(err.splitlines()) == 1


def test_bench_pool_has_the_cpu_presets_shapes(tmp_path):
    pool = expertpool.open_pool(make_bench_pool(str(tmp_path / "bench.db")))
    assert len(pool.tasks) == 5 and pool.input_shape == (1, 28, 28)
    assert pool.compose(pool.tasks)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_measurements_run_on_a_pool_and_report_equal_fused_outputs(tiny_pool_path):
    compose = bench_compose(str(tiny_pool_path), quick=True)
    assert compose["n_tasks"] == 4 and 0 < compose["compose_ms_p50"] <= compose["compose_ms_p99"]
    fused = bench_fused(str(tiny_pool_path), quick=True, batch=32)
    assert fused["fused_max_abs_diff"] < 1e-5 and fused["fused_speedup"] > 0
    assert fused["fused_choices"]["experts"] in ("grouped", "separate") and 0 < fused["plain_library_share"] < 1.5
    assert fused["fused_choices"]["engine"] in ("torch", "onnxruntime")
    assert fused["fused_torch_speedup"] > 0 and fused["fused_onnxruntime_speedup"] > 0
    export = bench_export(str(tiny_pool_path), quick=True)
    assert export["export_onnx_ms_p50"] > 0 and export["onnxruntime_batch1_ms_p50"] > 0
