"""Run the benchmarks and render RESULTS.md.

    python -m benchmarks.run                       # everything, full size (75-100 min on 2 cores)
    python -m benchmarks.run --quick --out /tmp/b  # smoke test, under 3 minutes
    python -m benchmarks.run --only data,inference # some of them; RESULTS.md keeps the others' JSON

Each benchmark writes ``<out>/<name>.json`` (data, train, inference, accuracy); RESULTS.md is then
rebuilt from every JSON file present in ``<out>``, and a full run into benchmarks/results also rewrites the
generated part of docs/benchmarks.md. To re-render both from the committed JSON files without running anything:
``python -c "from benchmarks.run import refresh_docs; refresh_docs()"``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.archive import render_md as _archive_md
from benchmarks.common import DEFAULT_OUT_DIR, DEFAULT_RSNA_DIR, hardware_info, log, write_result
from benchmarks.cpu_ablation import render_md as _cpu_ablation_md
from benchmarks.gpu_recipe.render import pending_md as _gpu_recipe_pending_md
from benchmarks.gpu_recipe.render import results_md as _gpu_recipe_md
from benchmarks.gpu_recipe.render import sweep_history_md as _gpu_recipe_sweep_md
from benchmarks.train_throughput import render_md as _train_throughput_md

BENCHMARKS = ("data", "train", "inference", "accuracy")
DEFAULT_BUDGET_MIN = 6.0
QUICK_BUDGET_MIN = 0.15
QUICK_OUT_DIR = Path(tempfile.gettempdir()) / "boneage-bench-quick"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny counts and budgets (under 3 minutes): checks the plumbing, measures nothing")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--budget-min", type=float, default=None,
                        help=f"accuracy: wall-clock minutes per run (9 runs) (default {DEFAULT_BUDGET_MIN:g}; "
                             f"--quick: {QUICK_BUDGET_MIN:g})")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result folder (default {DEFAULT_OUT_DIR.relative_to(DEFAULT_OUT_DIR.parents[1])}, "
                             f"with --quick {QUICK_OUT_DIR}, so quick runs never overwrite the committed results)")
    parser.add_argument("--rsna", type=Path, default=DEFAULT_RSNA_DIR,
                        help="shared RSNA sample (labels.csv + images/); phantoms are used when it is absent")
    parser.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="scratch folder (caches, big PNGs, runs); default: a temporary folder, deleted after")
    args = parser.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown or not only:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(BENCHMARKS)}")
    args.only = [b for b in BENCHMARKS if b in only]
    if args.budget_min is None:
        args.budget_min = QUICK_BUDGET_MIN if args.quick else DEFAULT_BUDGET_MIN
    if args.budget_min <= 0:
        parser.error("--budget-min must be positive")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.out is None:
        # quick numbers never overwrite the committed full results
        args.out = QUICK_OUT_DIR if args.quick else DEFAULT_OUT_DIR
    return args


def run_one(name: str, args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    common = {"quick": args.quick, "rsna_dir": args.rsna, "work_dir": work_dir, "threads": args.threads}
    if name == "data":
        from benchmarks import data_pipeline
        return data_pipeline.run(args.out, **common)
    if name == "train":
        from benchmarks import train_throughput
        return train_throughput.run(args.out, **common)
    if name == "inference":
        from benchmarks import inference_latency
        return inference_latency.run(args.out, **common)
    from benchmarks import accuracy
    return accuracy.run(args.out, budget_min=args.budget_min, **common)


# --- RESULTS.md -----------------------------------------------------------------------------------

def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:,.{digits}f}"
    return str(value)


def _hardware_line(result: dict[str, Any]) -> str:
    hw = result.get("hardware", {})
    fm = f" ({hw['cpu_family_model']})" if hw.get("cpu_family_model") else ""
    load = hw.get("load_average_1_5_15")
    return (f"{hw.get('cpu_model', '?')}{fm}, {hw.get('cpu_usable_cores', '?')} usable cores, torch "
            f"{hw.get('torch', '?')}, onnxruntime {hw.get('onnxruntime', '?')}, Python {hw.get('python', '?')}; "
            f"load average at start {load}; {result.get('date', '?')}; mode: {result.get('mode', '?')}")


def _data_md(r: dict[str, Any]) -> list[str]:
    lines = ["## Data pipeline (samples/s, higher is better)", "",
             f"_{_hardware_line(r)}_", "",
             f"Headline: {r['headline']}: ours **{_f(r['ours_samples_per_s'], 0)}**/s vs original recipe "
             f"(emulated) **{_f(r['seed_samples_per_s'], 0)}**/s = **{_f(r['speedup'])}x** (target >= 10x: "
             f"{'met' if r.get('target_met') else 'not met'}).", "",
             "| images | num_workers | ours (cache) | original recipe, emulated | ours without cache "
             "| speedup vs recipe | speedup vs no cache |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in r["image_sets"].items():
        for w, x in s["per_num_workers"].items():
            label = f"{name} ({', '.join(s['image_hw'])}, {s['n_images']} files, ~{_f(s['mean_file_kib'], 0)} KiB)"
            lines.append(f"| {label} | {w} | {_f(x['ours_samples_per_s'], 0)} | {_f(x['seed_samples_per_s'], 1)} "
                         f"| {_f(x['nocache_samples_per_s'], 1)} | {_f(x['speedup'])}x "
                         f"| {_f(x['speedup_vs_nocache'])}x |")
    lines += ["", "| images | cache build (one-off, not in 'ours') | per image | workers | first epoch incl. build |",
              "|---|---:|---:|---:|---:|"]
    for name, s in r["image_sets"].items():
        lines.append(f"| {name} | {_f(s['cache_build_s'])} s | {_f(s['cache_build_ms_per_image'])} ms "
                     f"| {s['cache_build_workers']} | {_f(s['ours_first_epoch_incl_cache_samples_per_s'], 0)}/s |")
    lines += ["", f"Output {r['output_size']} px, batch {r['batch_size']}, {r['statistic']}.", ""]
    lines += [f"- {n}" for n in r.get("notes", [])]
    return lines


def _train_md(r: dict[str, Any]) -> list[str]:
    lines = ["## Training throughput (images/s, forward + backward + optimizer step)", "",
             f"_{_hardware_line(r)}_", "",
             f"| config | model | input | batch (config's) | CPU, threads: {r['torch_threads']} | GPU |",
             "|---|---|---:|---:|---:|---|"]
    for name, c in r["configs"].items():
        batch = f"{c['batch_size']}" + (f" ({c['config_batch_size']}, reduced)" if c["batch_reduced_for_cpu"]
                                        else f" ({c['config_batch_size']})")
        lines.append(f"| {name} | {c['model']} | {c['input_size']} px | {batch} | {_f(c['images_per_s'], 2)} "
                     f"| not measured |")
    lines += [""] + [f"- {n}" for n in r.get("notes", [])]
    return lines


def _inference_md(r: dict[str, Any]) -> list[str]:
    b = r["batches"]
    e2e = r["end_to_end_batch1"]
    lines = ["## Inference latency (ms, lower is better)", "",
             f"_{_hardware_line(r)}_", "",
             f"{r['config']} ({r['model']}, {r['input_size']} px), {r['weights']}; threads: {r['threads']}; "
             f"p50 / p95 over {b['batch1']['torch']['runs']} (batch 1) and {b['batch32']['torch']['runs']} "
             f"(batch 32) runs after warm-up.", "",
             "| device | runtime | batch 1 p50 | batch 1 p95 | batch 32 p50 | batch 32 p95 | batch 32 images/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key, label in (("torch", "PyTorch eager"), ("onnx", "ONNX Runtime")):
        lines.append(f"| CPU | {label} | {_f(b['batch1'][key]['p50_ms'], 2)} | {_f(b['batch1'][key]['p95_ms'], 2)} "
                     f"| {_f(b['batch32'][key]['p50_ms'], 1)} | {_f(b['batch32'][key]['p95_ms'], 1)} "
                     f"| {_f(b['batch32'][f'{key}_images_per_s'], 0)} |")
    lines.append("| GPU | any | not measured | not measured | not measured | not measured | not measured |")
    lines += ["", f"End to end, one file ({e2e['steps']}): PyTorch p50 {_f(e2e['torch']['p50_ms'], 1)} ms, "
              f"ONNX Runtime p50 {_f(e2e['onnx']['p50_ms'], 1)} ms. Largest torch/ONNX difference: "
              f"{r['max_abs_diff_months_torch_vs_onnx']:.2g} months."]
    if r.get("notes"):
        lines.append("")
    lines += [f"- {n}" for n in r.get("notes", [])]
    return lines


def _accuracy_row(key: str, x: dict[str, Any], what: str) -> str:
    planned = "budget" if x.get("schedule_completed") is None else str(x["epochs_planned"])
    return (f"| {key} | {what} | **{_f(x['mae'], 2)}** | {_f(x['rmse'], 2)} | {_f(x.get('within_12_months_pct'), 1)} "
            f"| {x['epochs_done']} / {planned} | {_f(x['train_elapsed_s'] / 60, 1)} |")


def _accuracy_md(r: dict[str, Any]) -> list[str]:
    runs, labels = r["runs"], r.get("labels", {})
    header = ["| run | what | MAE (best epoch) | RMSE | % within 12 months | epochs done / planned | minutes |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines = ["## Accuracy under a fixed CPU budget (validation, months)", "",
             f"_{_hardware_line(r)}_", "",
             f"{r['dataset']}; validation split: {r['n_val']} images (val_fraction {r['split']['val_fraction']}, "
             f"split_seed {r['split']['split_seed']}, stratified), {r['n_train']} training images; budget "
             f"{_f(r['budget_s'] / 60, 2)} min per run on CPU, threads: {r['threads']}, one run after another"
             + (f"; inputs {r['input_size_override']} px (quick mode)" if r.get("input_size_override") else "")
             + ".", "", *header]
    for key in r["config_rows"]:
        lines.append(_accuracy_row(key, runs[key], labels.get(key, "")))
    lines.append(f"| mean predictor | baseline | {_f(r['baseline_mae'], 2)} | | | | |")
    lines.append("| GPU | | not measured | | | | |")
    lines += ["", f"cpu-small / BoneNet-S MAE ratio {_f(r['mae_ratio_cpu_small_to_bonenet_s'], 2)}; cpu-small / "
              f"paper-m46 {_f(r['mae_ratio_cpu_small_to_paper_m46'], 2)}. Plot: `img/{Path(r['plot']).name}`.", "",
              "### cpu-small ablation (same budget, each row adds one change to the row above)", "", *header]
    ladder = [k for k in r["order"] if k not in r["config_rows"]]
    end = r.get("ladder_end", "")
    build = [k for k in ladder if "-160-" not in k and k != end]  # steps towards it; "-160-" rows vary it
    previous = None
    for key in build:
        x = runs[key]
        delta = "" if previous is None else f" ({x['mae'] - previous:+.2f})"
        lines.append(_accuracy_row(key, x, labels.get(key, "") + delta))
        previous = x["mae"]
    recipe = runs.get(r.get("ladder_end", ""))
    if recipe is not None and previous is not None:
        what = labels.get(end, "")
        what = what if what.startswith("+") else f"+ 160 px = {what}"
        lines.append(_accuracy_row(end, recipe, f"{what} ({recipe['mae'] - previous:+.2f})"))
        for key in (k for k in ladder if "-160-" in k):
            x = runs[key]
            lines.append(_accuracy_row(key, x, f"{labels.get(key, '')} ({x['mae'] - recipe['mae']:+.2f} vs {end})"))
    lines += [""] + [f"- {n}" for n in r.get("notes", [])]
    return lines


def _generic_md(path: Path) -> list[str]:
    """Top-level numbers and strings of a result file this module does not know (written by another script)."""
    lines = [f"## {path.stem} (`{path.name}`)", ""]
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return lines + [f"{path.name} could not be read ({exc})."]
    if not isinstance(result, dict):
        return lines + [f"{path.name} does not hold a JSON object."]
    if isinstance(result.get("hardware"), dict):
        lines += [f"_{_hardware_line(result)}_", ""]
    rows = [(k, v) for k, v in result.items() if isinstance(v, (int, float, str)) and k != "date"]
    lines += ["| key | value |", "|---|---:|"] + [f"| {k} | {_f(v, 2)} |" for k, v in rows]
    return lines


def _recipe_md(r: dict[str, Any]) -> list[str]:
    """The 30-minute cpu-small run (written by hand from `boneage train` / `boneage evaluate`, see its commands)."""
    hw, ev, tta = r["hardware"], r["evaluate"], r["evaluate_tta"]
    lines = ["## cpu-small, the full 30-minute recipe (`recipe.json`)", "",
             f"_{hw['cpu_model']}, {hw['cores']} cores, {hw['memory_gib']} GiB, no GPU, torch {hw['torch']}, "
             f"Python {hw['python']}; {r['date']}_", "",
             f"`boneage train --config cpu-small`: {_f(r['train_wall_s_incl_cache'] / 60, 1)} min wall including the "
             f"cache build, {r['epochs_done']} of {r['epochs_planned']} epochs ({r['stopped_by']}), best epoch "
             f"{r['best_epoch']}, peak RSS {_f(r['train_peak_rss_mib'], 0)} MiB.", "",
             "| `boneage evaluate` on the 1,014 held-out images | MAE | RMSE | median | % within 12 months |",
             "|---|---:|---:|---:|---:|"]
    for name, e in (("best.pt", ev), ("best.pt, `--tta`", tta)):
        lines.append(f"| {name} | **{_f(e['mae_months'], 2)}** | {_f(e['rmse_months'], 2)} "
                     f"| {_f(e['median_ae_months'], 2)} | {_f(e['within_12_months_pct'], 1)} |")
    for name, e in r.get("more_evaluations", {}).items():
        lines.append(f"| {name} | {_f(e['mae_months'], 2)} | {_f(e['rmse_months'], 2)} "
                     f"| {_f(e['median_ae_months'], 2)} | {_f(e['within_12_months_pct'], 1)} |")
    lines += ["", "Validation MAE by epoch: " + ", ".join(f"{h['valid_mae_months']:.2f}" for h in r["history"]) + "."]
    return lines


def _ood_md(r: dict[str, Any]) -> list[str]:
    """The out-of-distribution refusal (``benchmarks/ood.py``)."""
    passed = ", ".join(r["nonhand_passed"]) or "none"
    return ["## Out-of-distribution refusal (`ood.json`, `python -m benchmarks.ood`)", "",
            f"_{_hardware_line(r)}_", "",
            f"Checkpoint `{r['checkpoint']}`; {r['method']}; threshold at the {r['percentile']:g}th percentile of "
            f"{r['fit_images']} training images' out-of-fold distances (fit {_f(r['fit_s'])} s).", "",
            "| images | n | refused | rate | scores (1 = threshold) |", "|---|---:|---:|---:|---|",
            f"| held-out real radiographs (false refusals) | {r['held_out_n']} | {r['held_out_refused']} | "
            f"{r['held_out_refused_pct']:.2f} % | max {r['held_out_max_score']:.2f}, 99th pct "
            f"{r['held_out_p99_score']:.2f} |",
            f"| non-hand images, seed {r['nonhand_seed']} | {r['nonhand_n']} | {r['nonhand_refused']} | "
            f"{r['nonhand_refused_pct']:.2f} % | min {r['nonhand_min_score']:.2f}, median "
            f"{r['nonhand_median_score']:.2f} |", "",
            f"Refused by the quality gate: {r['nonhand_refused_by_quality_gate']}; by the model's check: "
            f"{r['nonhand_refused_by_model_check']}. Passed: {passed}."]


PIPELINE_DATE = "2026-12-06T15:15"  # the analysis pipeline (issue 27) replaced the per-file/batched predict code


def _throughput_md(r: dict[str, Any]) -> list[str]:
    """Files per second of predict (``benchmarks/throughput.py``)."""
    before = {row["config"]: row["files_per_s"] for row in r.get("before_png_fix", {}).get("rows", [])}
    lines = ["## Prediction throughput (`throughput.json`, `python -m benchmarks.throughput`)", "",
             f"_{_hardware_line(r)}_", "",
             f"{r['n']} shared-sample radiographs, checkpoint `{r['checkpoint']}`, TTA "
             f"{'on' if r.get('tta') else 'off'}, Grad-CAM off but in its own row, every report written, batch size "
             f"{r['batch_size']}. `boneage predict`'s defaults have TTA and Grad-CAM on: no row here is the default "
             "settings' rate."
             + (" Measured before the analysis pipeline (`boneage.inference.pipeline`) replaced the code it timed; "
                "`archive.json` below is the current pipeline's rate." if r.get("date", "") < PIPELINE_DATE else ""),
             "",
             "| configuration | files/s | before the PNG fix (200 files) | peak RSS MB | workers' peak RSS MB |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {row['config']} | {row['files_per_s']:.1f} | {_f(before.get(row['config']))} | "
              f"{row['peak_rss_mb']} | {_f(row.get('peak_rss_mb_workers'))} |" for row in r["rows"]]
    return lines


RENDERERS = {"data": _data_md, "train": _train_md, "inference": _inference_md, "accuracy": _accuracy_md,
             "recipe": _recipe_md, "ood": _ood_md, "throughput": _throughput_md,
             "gpu_recipe": _gpu_recipe_md, "gpu_recipe_sweep": _gpu_recipe_sweep_md, "archive": _archive_md,
             "train_throughput": _train_throughput_md, "cpu_ablation": _cpu_ablation_md}
TITLES = {"data": "Data pipeline", "train": "Training throughput", "inference": "Inference latency",
          "accuracy": "Accuracy under a fixed CPU budget", "recipe": "cpu-small, the full 30-minute recipe",
          "ood": "Out-of-distribution refusal", "throughput": "Prediction throughput",
          "gpu_recipe_sweep": "cpu-small variants trained on a GPU", "archive": "Predict over an archive",
          "train_throughput": "Training step: data path vs model", "gpu_recipe": "GPU recipe",
          "cpu_ablation": "cpu-small: loader and progressive-resizing ablation"}
NOT_MEASURED = {"gpu_recipe": _gpu_recipe_pending_md}  # sections shown (as not measured) before their JSON exists


def render_results(out_dir: Path) -> Path:
    """Rebuild ``<out_dir>/RESULTS.md`` from the JSON files there."""
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.run` from the JSON files beside this one; method and caveats: "
             "`benchmarks/README.md`. GPU rows are not measured.", ""]
    found = False
    extra = ("train_throughput", "cpu_ablation", "recipe", "gpu_recipe", "gpu_recipe_sweep", "ood", "throughput",
             "archive")
    for name in (*BENCHMARKS, *extra):
        path = out_dir / f"{name}.json"
        if name in NOT_MEASURED and not path.is_file():
            lines += NOT_MEASURED[name]() + [""]
            continue
        if name in extra and not path.is_file():
            continue
        if not path.is_file():
            lines += [f"## {TITLES[name]}", "", f"Not run yet: `python -m benchmarks.run --only {name}`.", ""]
            continue
        found = True
        try:
            lines += RENDERERS[name](json.loads(path.read_text())) + [""]
        except (KeyError, TypeError, ValueError) as exc:
            lines += [f"## {TITLES[name]}", "", f"{path.name} could not be rendered ({type(exc).__name__}: {exc}).", ""]
    for path in sorted(out_dir.glob("*.json")):  # results of other benchmarks (e.g. serve.json of serve_load)
        if path.stem in RENDERERS:
            continue
        found = True
        lines += _generic_md(path) + [""]
    if not found:
        lines.append("No results yet.")
    target = out_dir / "RESULTS.md"
    target.write_text("\n".join(lines).rstrip() + "\n")
    return target


BENCHMARKS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
PAGE_START, PAGE_END = "<!-- BENCHMARKS:START -->", "<!-- BENCHMARKS:END -->"
PAGE_NOTE = ("<!-- Generated from benchmarks/results/*.json by benchmarks/run.py (include_in_docs): do not edit by "
             "hand; re-render with `python -c \"from benchmarks.run import refresh_docs; refresh_docs()\"`. -->")


def include_in_docs(results_md: Path, page: Path = BENCHMARKS_PAGE) -> bool:
    """Copy the sections of RESULTS.md (from its first ``## `` heading on) between the page's benchmark markers.

    The page's own text outside the markers is kept; the part between them is only ever written here, so the
    docs' tables are always those rendered from the JSON files. False (nothing written) when a marker is missing.
    """
    text = page.read_text(encoding="utf-8")
    if PAGE_START not in text or PAGE_END not in text:
        return False
    lines = results_md.read_text(encoding="utf-8").splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    body = "\n".join(lines[first:]).strip()
    head, rest = text.split(PAGE_START, 1)
    page.write_text(f"{head}{PAGE_START}\n{PAGE_NOTE}\n\n{body}\n\n{PAGE_END}{rest.split(PAGE_END, 1)[1]}",
                    encoding="utf-8")
    return True


def refresh_docs(out_dir: Path = DEFAULT_OUT_DIR, page: Path = BENCHMARKS_PAGE) -> Path:
    """Re-render ``<out_dir>/RESULTS.md`` and the tables of docs/benchmarks.md from the JSON files; runs nothing."""
    md = render_results(out_dir)
    if not include_in_docs(md, page):
        raise ValueError(f"{page} lacks the {PAGE_START} / {PAGE_END} markers")
    return md


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="boneage-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    log(f"{'quick' if args.quick else 'full'} run of {', '.join(args.only)} -> {args.out} (scratch {work_dir})")
    failed = []
    start = time.perf_counter()
    try:
        for name in args.only:
            t0 = time.perf_counter()
            hardware = hardware_info(args.threads)  # the load average just before this benchmark
            try:
                result = run_one(name, args, work_dir)
            except Exception:  # noqa: BLE001 - report, carry on with the others, fail at the end
                traceback.print_exc()
                failed.append(name)
                continue
            result["duration_s"] = round(time.perf_counter() - t0, 1)
            path = write_result(args.out, name, result, hardware)
            log(f"{name}: done in {result['duration_s']} s -> {path}")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    md = render_results(args.out)
    log(f"wrote {md} ({time.perf_counter() - start:.0f} s in all)")
    if not args.quick and args.out.resolve() == DEFAULT_OUT_DIR.resolve() and include_in_docs(md):
        log(f"updated the tables of {BENCHMARKS_PAGE}")
    print(md.read_text())
    if failed:
        print(f"benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
