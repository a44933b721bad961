from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from edgetransfer.bench import SCHEMA, BenchOptions, bench_run
from edgetransfer.cli import main
from edgetransfer.data import DataSpec
from edgetransfer.errors import DataError, EdgeTransferError, RunError, UnknownNameError
from edgetransfer.export import ExportOptions, export_onnx
from edgetransfer.finetune import FinetuneConfig, finetune
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants

from conftest import write_folder

QUICK = BenchOptions(batch_sizes=(1, 4), warmup=1, iterations=3, eval_images=40)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = finetune(FinetuneConfig(data=DataSpec(limit_per_class=20), epochs=5), tmp_path_factory.mktemp("bench") / "run").run_dir
    export_onnx(run)
    export_onnx(run, ExportOptions(fuse_preprocess=True))
    build_variants(run, [Target.ORT_CPU], [Precision.FP32, Precision.INT8], QuantOptions(calib_size=32, max_accuracy_drop=100))
    return run


@pytest.fixture(scope="module")
def report(run_dir):
    return bench_run(run_dir, QUICK)


def rows(report):
    return {r["variant"]: r for r in report["results"]}


def test_every_variant_is_measured_against_eager_in_the_same_run(report):
    results = rows(report)
    assert set(results) >= {"eager", "onnx", "onnx-uint8", "ort-cpu-fp32", "ort-cpu-int8"}
    assert results["eager"]["speedup_vs_eager"] == {"1": 1.0, "4": 1.0}
    for name in ("eager", "onnx", "onnx-uint8", "ort-cpu-fp32", "ort-cpu-int8"):
        row = results[name]
        assert row["status"] == "measured", row
        for batch in ("1", "4"):
            t = row["latency"][batch]
            assert t["iterations"] == 3 and 0 < t["p50_ms"] <= t["p99_ms"] and t["throughput_ips"] > 0
        assert row["cold_start_s"] > 0 and row["size_bytes"] > 0 and row["rss_mb"] > 0
        assert row["process_peak_rss_mb"] >= row["rss_mb"] * 0.9
    assert results["onnx"]["provider"] == "CPUExecutionProvider"


def test_accuracy_and_agreement_with_eager(report):
    results = rows(report)
    eager = results["eager"]["accuracy"]
    assert report["eval_images"] == 40 and 0.5 < eager["top1"] <= eager["top5"]
    for name in ("onnx", "onnx-uint8", "ort-cpu-fp32"):
        accuracy = results[name]["accuracy"]
        assert accuracy["top1_agreement"] == 1.0 and accuracy["max_abs_logit_diff"] < 1e-3
        assert accuracy["top1_change_points"] == 0.0
    int8 = results["ort-cpu-int8"]["accuracy"]
    assert int8["top1_agreement"] >= 0.8 and int8["max_abs_logit_diff"] > 1e-3  # really quantised


def test_report_files_and_recommendation(run_dir, report):
    saved = json.loads((run_dir / "bench.json").read_text())
    assert saved["schema"] == SCHEMA and saved["complete"] is True
    machine = saved["machine"]
    assert machine["threads"] == os.cpu_count() and machine["ort_spinning"] is False
    assert {"avx2", "vnni", "amx"} <= set(machine["cpu"]) and "torch" in machine["versions"]
    recommendation = saved["recommendation"]
    measured = [r for r in saved["results"] if r["status"] == "measured" and r["variant"] != "eager"]
    within = [r for r in measured if r["accuracy"]["top1_change_points"] >= -1.0]
    assert recommendation["variant"] == min(within, key=lambda r: r["latency"]["1"]["mean_ms"])["variant"]
    assert "| variant | batch |" in (run_dir / "bench.md").read_text()
    assert (run_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_corrupt_artifact_fails_alone(run_dir, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    report = bench_run(run_dir, BenchOptions(batch_sizes=(1,), warmup=0, iterations=2, eval_images=16,
                                             variants=("onnx",), models=(broken,)), out_dir=tmp_path)
    results = rows(report)
    assert results["broken.onnx"]["status"] == "failed" and "broken.onnx" in results["broken.onnx"]["reason"]
    assert results["onnx"]["status"] == "measured" and results["eager"]["status"] == "measured"


def test_auto_threads_picks_and_records_a_count(run_dir, tmp_path):
    report = bench_run(run_dir, BenchOptions(batch_sizes=(1,), warmup=0, iterations=2, eval_images=8,
                                             variants=("ort-cpu-int8",), auto_threads=True), out_dir=tmp_path)
    assert all(1 <= r["threads"] <= os.cpu_count() for r in report["results"])


def test_bad_input(run_dir, tmp_path):
    with pytest.raises(RunError, match=r"no fine-tuned run at"):
        bench_run(tmp_path / "nothing", QUICK)
    with pytest.raises(EdgeTransferError, match=r"batch sizes must be at least 1"):
        BenchOptions(batch_sizes=(0,))
    with pytest.raises(UnknownNameError, match=r"unknown variant 'ort-cpu-int4'. Did you mean 'ort-cpu-int8'"):
        bench_run(run_dir, BenchOptions(variants=("ort-cpu-int4",)))
    other = write_folder(tmp_path / "other", per_class=3, classes=3)
    with pytest.raises(DataError, match=r"are not the model's"):
        bench_run(run_dir, BenchOptions(data=other))


def test_cli_gate_fails_when_nothing_is_within_budget(run_dir, tmp_path):
    args = ["bench", str(run_dir), "--batch-sizes", "1", "--iterations", "2", "--warmup", "0", "--eval-images", "8", "-q",
            "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args + ["--variant", "onnx"])
    assert result.exit_code == 0, result.output
    assert "recommended: onnx" in result.output
    result = CliRunner().invoke(main, args + ["--variant", "eager", "--fail-over-budget"])
    assert result.exit_code == 2 and "no variant is within 1.0 top-1 points" in result.output
    result = CliRunner().invoke(main, ["bench", str(run_dir), "--batch-sizes", "1,x"])
    assert result.exit_code == 1 and "--batch-sizes takes comma-separated whole numbers" in result.output
