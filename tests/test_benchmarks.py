"""The benchmark suite runs end to end in quick mode and writes its result files with the fixed keys."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package of the repository, not of boneage
    sys.path.insert(0, str(REPO))

from benchmarks.run import parse_args, render_results  # noqa: E402
from boneage.config import shipped_configs  # noqa: E402

FIXED_KEYS = {
    "data": ("ours_samples_per_s", "seed_samples_per_s", "speedup"),
    "train": (),
    "inference": ("torch_p50_ms", "onnx_p50_ms", "torch_p95_ms", "onnx_p95_ms", "torch_batch32_p50_ms",
                  "onnx_batch32_p50_ms"),
    "accuracy": ("cpu_small_mae", "paper_m46_mae", "baseline_mae", "budget_s", "cpu_small_rmse", "paper_m46_rmse",
                 "n_val"),
}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_quick_run_writes_every_result_file(tmp_path):
    out = tmp_path / "results"
    # one thread: on a shared 2-core machine, 2 OpenMP threads stall; the full run keeps the default of 2
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), "--threads", "1",
                           "--work-dir", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, keys in FIXED_KEYS.items():
        result = json.loads((out / f"{name}.json").read_text())
        for key in keys:
            assert _positive(result[key]), f"{name}.json: {key} = {result.get(key)!r}"
        assert result["mode"] == "quick"
        assert result["hardware"]["cpu_model"] and result["hardware"]["torch"] and result["date"]
        assert result["gpu"] == "not measured"
    data = json.loads((out / "data.json").read_text())
    assert set(data["image_sets"]) >= {"synthetic_2000x1500"}
    for image_set in data["image_sets"].values():
        assert set(image_set["per_num_workers"]) == {"0", "2"}
        assert _positive(image_set["cache_build_s"]) and image_set["cache_build_included_in_ours"] is False
    train = json.loads((out / "train.json").read_text())
    assert set(train["configs"]) == set(shipped_configs())  # every shipped config's training throughput
    assert all(_positive(v) for v in train["images_per_s"].values())
    inference = json.loads((out / "inference.json").read_text())
    assert inference["max_abs_diff_months_torch_vs_onnx"] < 0.1
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["n_val"] >= 5 and accuracy["runs"]["cpu-small"]["epochs_done"] >= 1
    md = (out / "RESULTS.md").read_text()
    for heading in ("Data pipeline", "Training throughput", "Inference latency", "Accuracy"):
        assert heading in md
    assert "not measured" in md and "Not run yet" not in md


def test_arguments_are_checked(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--only", "data,nonsense"])
    with pytest.raises(SystemExit):
        parse_args(["--budget-min", "0"])
    args = parse_args(["--only", "inference,data", "--out", str(tmp_path)])
    assert args.only == ["data", "inference"] and args.out == tmp_path
    assert parse_args(["--quick"]).out != REPO / "benchmarks" / "results"  # quick never overwrites the results


def test_results_md_with_no_results(tmp_path):
    md = render_results(tmp_path).read_text()
    assert "Not run yet" in md and "No results yet" in md


@pytest.mark.slow
@pytest.mark.realdata
def test_archive_benchmark_quick_path(tmp_path, rsna_dir):
    """``benchmarks.archive`` on a tiny archive: every number it reports is there and sane; the scratch is gone."""
    out, work = tmp_path / "results", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.archive", "--quick", "--files", "96", "--rss-files", "96",
                           "--full-size", "2", "--profile-files", "32", "--workers", "0", "--model-seconds", "0.5",
                           "--rsna", str(rsna_dir), "--work", str(work), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((out / "archive.json").read_text())
    assert r["mode"] == "quick" and r["hardware"]["cpu_model"] and r["date"]
    assert r["files"] == 96 and r["best_workers"] == 0 and r["batch_size"] == 32
    for key in ("model_only_images_per_s", "end_to_end_files_per_s_excl_startup",
                "end_to_end_files_per_s_incl_startup"):
        assert _positive(r[key]), f"{key} = {r[key]!r}"
    for reports in ("none", "all"):
        run = r["end_to_end"][reports]["0"]
        assert run["files"] == 96 and _positive(run["files_per_s_incl_startup"]) and _positive(run["startup_s"])
    assert 0 < r["ratio_excl_startup"] <= 2 and 0 < r["ratio_incl_startup"] <= 2
    memory = r["memory"]
    for at in ("at_first_mark", "at_end"):
        assert _positive(memory[at]["rss_tree_mb"]) and _positive(memory[at]["rss_main_mb"])
        assert memory[at]["rss_tree_mb"] >= memory[at]["rss_main_mb"]
    assert isinstance(memory["growth_tree_mb"], float) and memory["samples"]
    assert r["profile"]["top_by_cumulative"] and _positive(r["profile"]["stages_cumulative_s"]["total (run_predict)"])
    full = r["full_size"]
    assert full["files"] == 2 and _positive(full["files_per_s_incl_startup"])
    assert _positive(full["profile_workers0"]["stages_cumulative_s"]["decode (read_image)"])
    assert "Predict over an archive" in (out / "RESULTS.md").read_text()
    assert work.is_dir() and not any(work.iterdir())  # inputs and outputs deleted
