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


def test_train_throughput_compares_the_full_step_with_the_model_alone(tmp_path):
    """``benchmarks.train_throughput`` on phantoms, tiny: both data paths' full step, the model-only step and
    their ratio are in the result file and its rendered section."""
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--device", "cpu", "--config",
                           "bonenet-s", "--batch-size", "4", "--warmup", "1", "--steps", "2", "--rounds", "1",
                           "--threads", "1", "--rsna", str(tmp_path / "absent"), "--out", str(out),
                           "--work-dir", str(tmp_path / "work"), "--note", "smoke test"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((out / "train_throughput.json").read_text())
    assert r["config"] == "bonenet-s" and r["batch_size"] == 4 and r["device"] == "cpu" and r["torch_threads"] == 1
    assert "phantoms" in r["data"] and "smoke test" in r["notes"] and r["hardware"]["torch"] and r["date"]
    assert [x["loader"] for x in r["rows"]] == ["workers", "device"]
    for x in r["rows"]:
        assert _positive(x["full_images_per_s"]) and _positive(x["model_images_per_s"])
        assert x["ratio"] == pytest.approx(x["full_images_per_s"] / x["model_images_per_s"])
        assert x["full_images_per_s"] == pytest.approx(4 * 2 / x["full_round_s"][0], rel=0.05)  # median of 1 round
    assert r["rows"][0]["model_images_per_s"] == r["rows"][1]["model_images_per_s"]  # one model-only measurement
    assert all(_positive(x["data_only_images_per_s"]) for x in r["rows"]) and r["mode"] == "full"
    md = render_results(out).read_text()
    assert "Training step: data path vs model" in md and f"{r['rows'][1]['ratio']:.2f} |" in md


def test_cpu_ablation_rows_are_read_from_the_run_folders_metrics(tmp_path):
    from benchmarks.cpu_ablation import render_md, row_result

    run = tmp_path / "device"
    run.mkdir()
    history = [{"epoch": 1, "train": {"n": 5728.0}, "valid": {"mae_months": 11.53}},
               {"epoch": 2, "train": {"n": 1000.0}, "valid": None}]
    (run / "metrics.json").write_text(json.dumps({
        "best": {"mae_months": 11.534, "epoch": 1, "within_12_months_pct": 61.23}, "epochs_done": 2,
        "elapsed_s": 580.1, "history": history}))
    row = row_result("device", run, 608.14)
    assert row == {"row": "device", "overrides": ["data.loader=device"], "epochs_done": 2, "images_trained": 6728,
                   "best_val_mae_months": 11.53, "best_epoch": 1, "best_within_12_months_pct": 61.2,
                   "val_mae_by_epoch": [11.53, None], "train_elapsed_s": 580.1, "command_wall_s": 608.1}
    md = render_md({"minutes": 10, "epochs": 5, "rows": [row], "notes": ["one run"], "hardware": {}, "date": "x"})
    assert "| device | `data.loader=device` | 2 | 6,728 | 11.53 | 61.2 % | 11.5, - | 608.1 |" in md
    assert md[-1] == "- one run"
