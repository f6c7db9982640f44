"""A device run's results -> ``benchmarks/results/gpu_recipe.json``, the section of RESULTS.md and
docs/benchmarks.md (``benchmarks.run``) and the README's block; until then, "not measured" with the command.

Also renders the retired ``gpu_recipe_sweep.json`` (the cpu-small variants that one borrowed H200 ranked before
this recipe replaced that script's own training loop), kept as history.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

from benchmarks.gpu_recipe import DEVICE_SCRIPT, REPO, RESULTS_NAME
from boneage.atomic import write_text

README = REPO / "README.md"
README_START, README_END = "<!-- GPU-RECIPE:START -->", "<!-- GPU-RECIPE:END -->"
TITLE = "GPU recipe: the GPU configs trained and measured on one GPU (`gpu_recipe.json`)"
NOT_MEASURED = "Not measured: no GPU lent yet."


def device_command() -> tuple[str, str]:
    """(command, carry) as ``device.sh`` prints them."""
    run = [subprocess.run(["bash", str(DEVICE_SCRIPT), flag], capture_output=True, text=True, check=True).stdout.strip()
           for flag in ("--command", "--carry")]
    return run[0], run[1]


def _f(value: Any, digits: int = 1) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def how_to_run(lead: str) -> str:
    """``lead``, how to run the recipe (wrapped like the README's prose), and the command in a code block."""
    command, carry = device_command()
    prose = (f"{lead} Build the pack here with `make gpu-recipe-pack`, run this one device command (carry `{carry}`, "
             f"`timeout_s` 600), then `python -m benchmarks.gpu_recipe render <files_at>/{RESULTS_NAME}`:")
    return textwrap.fill(prose, 118, break_on_hyphens=False, break_long_words=False) + f"\n\n```bash\n{command}\n```"


def pending_md() -> list[str]:
    return [f"## {TITLE}", "", how_to_run(NOT_MEASURED)]


def _val(run: dict[str, Any], mode: str, key: str, digits: int = 2) -> str:
    return _f(run["val"][mode].get(key), digits)


def _status(rec: dict[str, Any]) -> str:
    return rec.get("status", "?") + (f" ({rec['reason']})" if rec.get("reason") else "") + (
        f" ({rec['error']})" if rec.get("error") else "")


def results_md(r: dict[str, Any]) -> list[str]:
    """The RESULTS.md / docs/benchmarks.md section of a device run."""
    env, runs = r["environment"], r["runs"]
    group = next(iter(r["pack"]["groups"].values()))
    lines = [f"## {TITLE}", "",
             f"_{env.get('gpu') or 'no GPU'}, torch {env['torch']} (CUDA {env.get('cuda')}), Python {env['python']}; "
             f"{r['started']}; status {r['status']}; {_f(r['summary'].get('total_wall_s'), 0)} s in all_", "",
             "One run of `python -m benchmarks.gpu_recipe run`: each config trained with `boneage train` on the "
             f"shared sample's standard split (val_fraction {r['settings']['val_fraction']}, seed "
             f"{r['settings']['split_seed']}; {r['pack']['split']['n_val']} validation images), from the pack's fp16 "
             f"ImageNet weights. Training and evaluation see WebP-decoded images (quality {group['quality']}, mean "
             f"error {group['mean_abs_error_gray_levels']} gray levels after the {group['preprocess']['size']}-px "
             f"preprocessing). Target: validation MAE <= {r['summary']['target_months']:g} months for the better "
             f"config (stretch {r['summary']['stretch_months']:g}).", "",
             "| config | epochs | train s | val MAE | with TTA | % within 12 m | with TTA | RMSE | train status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, run in runs.items():
        t = run["train"]
        lines.append(f"| `{name}` | {t.get('epochs_done', '—')} | {_f(t.get('wall_s'), 0)} | "
                     f"**{_val(run, 'plain', 'mae_months')}** | {_val(run, 'tta', 'mae_months')} | "
                     f"{_val(run, 'plain', 'within_12_months_pct', 1)} | {_val(run, 'tta', 'within_12_months_pct', 1)} "
                     f"| {_val(run, 'plain', 'rmse_months')} | {_status(t)} |")
    bands = sorted({b for run in runs.values() for b in run["val"]["plain"].get("mae_by_band", {})},
                   key=lambda b: int(b.split("-")[0]))
    if bands:
        lines += ["", "MAE by 2-year band of bone age (months, without TTA; n in the band):", "",
                  "| config | " + " | ".join(bands) + " |", "|---|" + "---:|" * len(bands)]
        first = next(run for run in runs.values() if run["val"]["plain"].get("mae_by_band"))
        lines.append("| n | " + " | ".join(str(first["val"]["plain"]["mae_by_band"].get(b, {}).get("n", "—"))
                                           for b in bands) + " |")
        for name, run in runs.items():
            band = run["val"]["plain"].get("mae_by_band", {})
            lines.append(f"| `{name}` | " + " | ".join(_f(band.get(b, {}).get("mae_months")) for b in bands) + " |")
    sets = sorted({s for run in runs.values() for s in run["evals"]})
    if sets:
        lines += ["", "Further labelled sets (`--eval`):", "", "| config | set | n | MAE | with TTA | % within 12 m |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, run in runs.items():
            for s in sets:
                e = run["evals"].get(s, {"plain": {}, "tta": {}})
                lines.append(f"| `{name}` | {s} | {e['plain'].get('n', '—')} | {_f(e['plain'].get('mae_months'), 2)} | "
                             f"{_f(e['tta'].get('mae_months'), 2)} | {_f(e['plain'].get('within_12_months_pct'))} |")
    lines += ["", "Inference on the device: batched `boneage predict` over the validation PNGs (TTA, Grad-CAM and "
              "reports off; model load included), fp16-vs-fp32 parity of `boneage evaluate --precision fp16` (target "
              "<= 0.1 months), one Grad-CAM heatmap, and the training-throughput ratio (full step over model only, "
              "per data path):", "",
              "| config | predict fp32 files/s | fp16 files/s | fp16 max / mean diff, months | Grad-CAM | "
              "throughput ratio |", "|---|---:|---:|---|---|---|"]
    for name, run in runs.items():
        p, g, q = run["parity"].get("precision_parity", {}), run["gradcam"], run["throughput_ratio"]
        cam = (f"ok on {g['ran_on']}, range {g['min']}-{g['max']}" if g.get("status") == "ok" else _status(g))
        lines.append(f"| `{name}` | {_f(run['predict']['fp32'].get('files_per_s'))} | "
                     f"{_f(run['predict']['fp16'].get('files_per_s'))} | "
                     f"{_f(p.get('max_abs_diff_months'), 3)} / {_f(p.get('mean_abs_diff_months'), 3)} | {cam} | "
                     f"{ratios(q) if q.get('status') == 'ok' else _status(q)} |")
    failed = r["summary"].get("failed_stages") or []
    lines += ["", f"Failed or unfinished stages: {', '.join(failed)}." if failed else "Every stage finished."]
    return lines


def ratios(q: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_f(v, 2)}" for k, v in q.get("ratio_by_loader", {}).items()) or "—"


def readme_block(r: dict[str, Any] | None) -> str:
    """The README's GPU paragraph (between the markers): the measured table, or "not measured" and the command."""
    if r is None:
        return how_to_run(f"**GPU recipe** (`lite0-gpu-299`, `lite2-gpu-299`). {NOT_MEASURED}")
    env, runs = r["environment"], r["runs"]
    group = next(iter(r["pack"]["groups"].values()))
    lines = [f"**GPU recipe** (one {env.get('gpu')}, torch {env['torch']}; "
             f"[`benchmarks/results/{RESULTS_NAME}`](benchmarks/results/{RESULTS_NAME}), "
             "`python -m benchmarks.gpu_recipe`, docs/benchmarks.md): each config trained once with `boneage train` "
             f"on the same split as above, from WebP-decoded images (quality {group['quality']}).", "",
             f"| GPU recipe on the {r['pack']['split']['n_val']:,} held-out images | MAE, months | % within 12 months "
             "| training s |", "|---|---:|---:|---:|"]
    for name, run in runs.items():
        for mode in ("plain", "tta"):
            label = f"`{name}`" + (", `--tta`" if mode == "tta" else "")
            train_s = _f(run["train"].get("wall_s"), 0) if mode == "plain" else ""
            lines.append(f"| {label} | {_val(run, mode, 'mae_months')} | {_val(run, mode, 'within_12_months_pct', 1)}"
                         f" | {train_s} |")
    return "\n".join(lines)


def update_readme(block: str, readme: Path = README) -> bool:
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    # blank lines around the block: the README checker (tests/test_readme_numbers.py) reads tables as blank-line
    # separated blocks of table rows only
    readme.write_text(f"{head}{README_START}\n\n{block}\n\n{README_END}{rest.split(README_END, 1)[1]}",
                      encoding="utf-8")
    return True


def render(path: Path, *, results_dir: Path | None = None, page: Path | None = None, readme: Path = README,
           allow_cpu: bool = False) -> list[Path]:
    """Copy a device run's results into ``results_dir`` and re-render RESULTS.md, docs/benchmarks.md and the
    README block; a CPU rehearsal's results are refused unless ``allow_cpu`` (tests)."""
    from benchmarks.run import BENCHMARKS_PAGE, DEFAULT_OUT_DIR, refresh_docs

    data = json.loads(Path(path).read_text())
    if data.get("benchmark") != "gpu_recipe" or not data.get("runs"):
        raise ValueError(f"{path} is no results file of benchmarks.gpu_recipe run")
    if not data["environment"].get("gpu") and not allow_cpu:
        raise ValueError(f"{path} was measured without a GPU (a rehearsal): not rendered as the GPU results")
    results_dir = results_dir or DEFAULT_OUT_DIR
    target = write_text(results_dir / RESULTS_NAME, json.dumps(data, indent=2) + "\n")
    md = refresh_docs(results_dir, page or BENCHMARKS_PAGE)
    written = [target, md, page or BENCHMARKS_PAGE]
    if update_readme(readme_block(data), readme):
        written.append(readme)
    return written


def sweep_history_md(r: dict[str, Any]) -> list[str]:
    """The retired ``gpu_recipe_sweep.json`` (history; the script that made it is in the git history)."""
    lines = ["## cpu-small variants at the CPU budget's epochs, trained on a GPU (`gpu_recipe_sweep.json`)", "",
             f"_{r['hardware']}; {r['date']}_", "", r["what"] + " (History: `benchmarks/gpu_recipe_sweep.py`, which "
             "trained these with its own loop, is retired with its variants file (both in the git history); "
             "`benchmarks/gpu_recipe` trains with `boneage train`.)", "",
             "| variant | px | frozen stages | epochs | changed | final MAE | % within 12 m | GPU s |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    fixed = {"name", "res", "fr", "epochs"}
    for run_ in sorted(r["runs"], key=lambda x: x["final_mae"]):
        v = run_["variant"]
        changed = ", ".join(f"{k}={v[k]}" for k in v if k not in fixed) or "none"
        lines.append(f"| {v['name']} | {v.get('res', 192)} | {v.get('fr', 2)} | {v['epochs']} | {changed} | "
                     f"**{run_['final_mae']:.2f}** | {100 * run_['final_within12']:.1f} | {run_['wall_s']:.0f} |")
    return lines + ["", r["conclusion"]]
