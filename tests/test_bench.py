from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from edgetransfer.bench import BenchOptions, bench_run
from edgetransfer.benchreport import BENCH_SCHEMA, BenchReport, Latency
from edgetransfer.cli import main
from edgetransfer.cpu import cpu_features
from edgetransfer.errors import DataError, EdgeTransferError, RunError, UnknownNameError
from edgetransfer.export import ExportOptions, export_onnx
from edgetransfer.optimize import Precision, QuantOptions, Target, build_variants
from edgetransfer.report import bench_markdown, recommendation_line
from edgetransfer.rundir import Manifest, RunDir
from edgetransfer.runinfo import run_summary
from edgetransfer.runtime.files import sha256_file

from conftest import copy_run, write_folder

QUICK = BenchOptions(batch_sizes=(1, 4), warmup=1, iterations=3, eval_images=40)


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory):
    run = copy_run(trained_run, tmp_path_factory, "bench")
    export_onnx(run)
    export_onnx(run, ExportOptions(fuse_preprocess=True))
    build_variants(run, [Target.ORT_CPU], [Precision.FP32, Precision.INT8], QuantOptions(calib_size=32, max_accuracy_drop=100))
    return run


@pytest.fixture(scope="module")
def report(run_dir):
    return bench_run(run_dir, QUICK)


def rows(report):
    return {r.variant: r for r in report.results}


def test_every_variant_is_measured_against_eager_in_the_same_run(run_dir, report):
    results = rows(report)
    assert list(results) == ["eager", "onnx", "onnx-uint8", "ort-cpu-fp32", "ort-cpu-int8"]
    eager = results["eager"]
    for row in results.values():
        assert row.status == "measured", row
        assert row.threads == os.cpu_count()
        for batch in ("1", "4"):
            t = row.latency[batch]
            assert t.batch == int(batch) and t.iterations == 5  # 3 asked for, at least one in each of 5 rounds
            assert len(t.round_p50_ms) == 5 and t.spread is not None and t.spread >= 0
            assert t.throughput_ips == pytest.approx(int(batch) * 1000 / t.mean_ms, rel=0.01)
            # the speed-up is eager's mean latency over this row's, measured in this run
            assert row.speedup_vs_eager[batch] == pytest.approx(eager.latency[batch].mean_ms / t.mean_ms, rel=0.01)
        assert row.cold_start_s > 0 and row.rss_mb > 0
    for name in ("onnx", "onnx-uint8", "ort-cpu-fp32", "ort-cpu-int8"):
        assert (
            results[name].size_bytes
            == (run_dir / f"{'model' if name == 'onnx' else 'model-uint8' if name == 'onnx-uint8' else name}.onnx").stat().st_size
        )
        assert results[name].provider == "CPUExecutionProvider" and results[name].kind == "onnx"
    assert eager.kind == "torch-checkpoint" and eager.provider == "torch-cpu"
    assert results["onnx-uint8"].backend_settings["intra_op_num_threads"] == str(os.cpu_count())


def test_accuracy_and_agreement_with_eager(report):
    results = rows(report)
    eager = results["eager"].accuracy
    assert report.eval_images == 40 and 0.5 < eager.top1 <= eager.top5
    for name in ("onnx", "onnx-uint8", "ort-cpu-fp32"):
        accuracy = results[name].accuracy
        assert accuracy.top1_agreement == 1.0 and accuracy.max_abs_logit_diff < 1e-3
        assert accuracy.top1_change_points == 0.0
    int8 = results["ort-cpu-int8"].accuracy
    assert int8.top1_agreement >= 0.7 and int8.max_abs_logit_diff > 1e-3  # really quantised (no guard here)
    assert int8.top1_change_points == pytest.approx(100 * (int8.top1 - eager.top1), abs=1e-3)
    low, high = int8.top1_change_interval
    assert low < int8.top1_change_points < high and high - low > 5  # 40 images: several points either way
    assert report.eval_split == "test" and "40 test images" in recommendation_line(report) + bench_markdown(report)


def test_report_files_and_recommendation(run_dir, report):
    saved = json.loads((run_dir / "bench.json").read_text())
    assert saved["schema"] == BENCH_SCHEMA and saved["complete"] is True
    assert BenchReport.from_dict(saved) == report  # bench.json round-trips through the typed report
    assert BenchReport.from_dict(saved).to_dict() == saved
    machine = saved["machine"]
    assert machine["threads"] == os.cpu_count() and machine["ort_spinning"] is False
    assert machine["cpu"] == cpu_features().to_dict() and "torch" in machine["versions"]
    recommendation = saved["recommendation"]
    measured = [r for r in saved["results"] if r["status"] == "measured" and r["variant"] != "eager"]
    within = [r for r in measured if r["accuracy"]["top1_change_points"] >= -1.0]
    assert recommendation["variant"] == min(within, key=lambda r: r["latency"]["1"]["mean_ms"])["variant"]
    assert "| variant | batch |" in (run_dir / "bench.md").read_text()
    assert (run_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entry = Manifest.load(run_dir).artifacts["bench"]
    assert entry["sha256"] == sha256_file(run_dir / "bench.json") and entry["kind"] == "bench-report"
    assert entry["parent"] == ["checkpoint", "onnx", "onnx-uint8", "ort-cpu-fp32", "ort-cpu-int8"]


def test_a_corrupt_artifact_fails_alone(run_dir, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    report = bench_run(
        run_dir, BenchOptions(batch_sizes=(1,), warmup=0, iterations=2, eval_images=16, variants=("onnx",), models=(broken,)), out_dir=tmp_path
    )
    results = rows(report)
    assert results["broken.onnx"].status == "failed" and "broken.onnx" in results["broken.onnx"].reason
    assert results["broken.onnx"].latency == {} and "latency" not in results["broken.onnx"].to_dict()
    assert results["onnx"].status == "measured" and results["eager"].status == "measured"


def test_auto_threads_times_each_count_and_keeps_the_fastest(run_dir, tmp_path, monkeypatch):
    import edgetransfer.bench as bench_module

    tried = []

    def fake_time(runner, inputs, batch, options):  # 1 thread is "fastest" here, whatever the machine
        count = int(runner.settings.get("intra_op_num_threads", "0")) if runner.settings else torch.get_num_threads()
        tried.append(count)
        return Latency(batch, 1, float(count), float(count), float(count), float(count), 1.0)

    monkeypatch.setattr(bench_module, "time_alone", fake_time)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    report = bench_run(
        run_dir,
        BenchOptions(batch_sizes=(1,), warmup=0, iterations=2, eval_images=8, threads=2, variants=("ort-cpu-int8",), auto_threads=True),
        out_dir=tmp_path,
    )
    assert [r.threads for r in report.results] == [1, 1] and tried.count(1) >= 2 and 2 in tried


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
    args = ["bench", str(run_dir), "--batch-sizes", "1", "--iterations", "2", "--warmup", "0", "--eval-images", "8", "-q", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args + ["--variant", "onnx"])
    assert result.exit_code == 0, result.output
    assert "recommended: onnx" in result.output
    result = CliRunner().invoke(main, args + ["--variant", "eager", "--fail-over-budget"])
    assert result.exit_code == 2 and "no variant is within 1.0 top-1 points" in result.output
    result = CliRunner().invoke(main, ["bench", str(run_dir), "--batch-sizes", "1,x"])
    assert result.exit_code == 2 and "Invalid value for '--batch-sizes': takes comma-separated whole numbers" in result.output


def test_variants_are_timed_in_turn_round_after_round_and_a_noisy_baseline_is_flagged():
    from edgetransfer.benchreport import BenchRow
    from edgetransfer.report import noisy_baseline
    from edgetransfer.timing import Timed, time_in_rounds

    calls = []

    class Fake:
        def __init__(self, name, fail_at=None):
            self.name, self.fail_at, self.count = name, fail_at, 0

        def infer(self, batch):
            self.count += 1
            if self.fail_at is not None and self.count >= self.fail_at:
                raise RuntimeError("device lost")
            calls.append(self.name)

    inputs = np.zeros((4, 3), np.float32)
    timed = [Timed(BenchRow(n, n, "onnx", status="measured"), Fake(n, fail_at=4 if n == "c" else None), inputs) for n in "abc"]
    time_in_rounds(timed, 1, BenchOptions(warmup=1, iterations=4, rounds=2))
    assert calls[:3] == ["a", "b", "c"]  # warm-up, each once
    assert calls[3:] == ["a", "a", "b", "b", "c", "c", "a", "a", "b", "b"]  # round 1, then round 2, where c broke
    a, b, c = (t.row for t in timed)
    assert a.latency["1"].iterations == 4 and len(a.latency["1"].round_p50_ms) == 2
    assert c.status == "failed" and "device lost" in c.reason and "1" not in c.latency

    report = BenchReport("now", "run", BenchOptions().to_dict(), None, 4, "sha")
    eager = BenchRow("eager", "model.pt", "torch-checkpoint", status="measured")
    eager.latency["1"] = Latency(1, 10, 20.0, 20.0, 30.0, 30.0, 50.0, [13.5, 17.4, 26.0, 33.7, 37.2])
    report.results.append(eager)
    assert "moved by 91% of its median" in noisy_baseline(report)  # (37.2 - 13.5) / 26.0
    eager.latency["1"] = Latency(1, 10, 20.0, 20.0, 30.0, 30.0, 50.0, [19.0, 20.0, 21.0])
    assert noisy_baseline(report) is None


def summary(run) -> str:
    """``info RUN``'s summary as text, wide enough that no cell wraps."""
    console = Console(width=400, record=True, file=io.StringIO())
    console.print(run_summary(RunDir(run)))
    return console.export_text()


def test_info_summarises_a_run_and_checks_each_artifact_against_its_sha256(run_dir, tmp_path):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = CliRunner().invoke(main, ["info", str(run_dir)])
    assert result.exit_code == 0 and "validation top-1" in result.output and "ort-cpu-int8" in result.output, result.output
    text = summary(run_dir)
    assert f"{100 * metrics['final']['top1']:.2f}% of {metrics['val_images']} images" in text
    assert f"{100 * metrics['test']['top1']:.2f}% of {metrics['test']['images']} images" in text
    assert "efficientnet_lite0 (head), 64 px" in text and "10 classes; 120 train, 40 val, 40 test images" in text
    manifest = json.loads((run_dir / "manifest.json").read_text())
    int8 = manifest["artifacts"]["ort-cpu-int8"]["report"]
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 6}
    assert set(manifest["artifacts"]) <= set(lines)
    assert f"{100 * int8['top1']:.2f}% of {int8['eval_images']} test images" in lines["ort-cpu-int8"]
    assert f"{100 * int8['integer_coverage']['integer_share']:.1f}%" in lines["ort-cpu-int8"]
    assert all(" ok " in lines[name] for name in manifest["artifacts"])
    # a changed file and a missing one are named as such; --json prints the manifest as it is
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with open(copy / "model.onnx", "ab") as model:
        model.write(b"\0")
    (copy / manifest["artifacts"]["ort-cpu-int8"]["path"]).unlink()
    text = summary(copy)
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 6}
    assert "changed since it was recorded" in lines["onnx"] and "missing" in lines["ort-cpu-int8"]
    result = CliRunner().invoke(main, ["info", str(copy), "--json"])
    assert json.loads(result.output) == manifest
