"""notebooks/demo.ipynb: stored without outputs, and runs top to bottom (phantoms; the RSNA sample if present).

The notebook is executed with nbclient in a temporary folder; the executed copy is written there
(never back into notebooks/). Its parameters come from the environment variables it reads.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "demo.ipynb"
RSNA_DIR = Path(__file__).resolve().parents[2] / "shared/data/rsna-bone-age"
FIGURES = (  # written by the notebook to OUT_DIR/figures/
    "01_age_by_sex", "02_radiographs", "03_preprocessing", "04_augmentations", "05_training_curves",
    "06_pred_vs_true", "07_bland_altman", "08_mae_by_band", "09_heatmaps", "10_clinical_chart",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CELL_TIMEOUT_S = 900


def _read_notebook():
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_stored_without_outputs():
    nb = _read_notebook()
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells, "the notebook has no code cells"
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"cells {dirty} keep outputs or an execution count: clear them before committing"
    assert "widgets" not in nb.metadata, "notebook metadata keeps widget state"
    for i, cell in enumerate(nb.cells):
        assert "widgets" not in cell.metadata, f"cell {i} keeps widget state"
        assert "ExecuteTime" not in cell.metadata and "execution" not in cell.metadata, f"cell {i} keeps timings"


def test_notebook_has_a_tagged_parameters_cell_first():
    nb = _read_notebook()
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", [])
    for name in ("DATA_DIR", "N_IMAGES", "EPOCHS", "SIZE", "OUT_DIR"):
        assert f"{name} = " in first_code.source
    for env in ("BONEAGE_DATA_DIR", "BONEAGE_NB_N", "BONEAGE_NB_EPOCHS", "BONEAGE_NB_SIZE", "BONEAGE_NB_OUT"):
        assert env in first_code.source


def _execute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> tuple[dict, Path, str]:
    """Run the notebook in tmp_path with ``env``; return (summary.json, OUT_DIR, printed text)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out = tmp_path / "out"
    monkeypatch.setenv("BONEAGE_NB_OUT", str(out))
    monkeypatch.setenv("BONEAGE_CACHE_DIR", str(tmp_path / "cache"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = NOTEBOOK.stat().st_mtime_ns
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.monotonic()
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / "demo.executed.ipynb")  # for debugging; never into notebooks/
    print(f"notebook ran in {time.monotonic() - start:.0f} s")
    assert NOTEBOOK.stat().st_mtime_ns == before, "executing the notebook must not rewrite notebooks/demo.ipynb"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream")
    return json.loads((out / "summary.json").read_text()), out, text


def _check_outputs(summary: dict, out: Path, text: str) -> None:
    # the last printed line is the one-line JSON summary, identical to summary.json
    last = [line for line in text.splitlines() if line.startswith("{")][-1]
    assert json.loads(last) == summary
    assert math.isfinite(summary["mae_months"]) and summary["mae_months"] >= 0
    assert summary["figures"] == len(FIGURES)
    for name in FIGURES:
        png = out / "figures" / f"{name}.png"
        assert png.is_file(), f"missing figure {png}"
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5_000, f"{png} is not a real PNG ({len(data)} bytes)"
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "best.pt").is_file() and (run_dir / "metrics.json").is_file()
    assert (out / "eval" / "metrics.json").is_file()
    records = list((out / "predictions").rglob("*.json"))  # reports/<shard>/<name>.json, heatmaps beside them
    assert records, "no per-image prediction reports"
    for path in records:
        record = json.loads(path.read_text())
        assert record["error"] is None and record["z_score"] is not None and record["category"]
        assert record["heatmap"] and (path.parent / record["heatmap"]).is_file()


@pytest.mark.slow
def test_notebook_runs_on_phantoms(tmp_path, monkeypatch):
    summary, out, text = _execute(tmp_path, monkeypatch, {
        "BONEAGE_DATA_DIR": "synth", "BONEAGE_NB_N": "240", "BONEAGE_NB_EPOCHS": "3", "BONEAGE_NB_SIZE": "96",
    })
    _check_outputs(summary, out, text)
    assert summary["data"] == "phantoms" and summary["n_images"] == 240 and summary["epochs"] == 3


@pytest.mark.slow
@pytest.mark.realdata
def test_notebook_runs_on_the_rsna_sample(tmp_path, monkeypatch):
    if not (RSNA_DIR / "labels.csv").is_file():
        pytest.skip(f"real RSNA sample not found at {RSNA_DIR}")
    summary, out, text = _execute(tmp_path, monkeypatch, {
        "BONEAGE_DATA_DIR": str(RSNA_DIR), "BONEAGE_NB_N": "300", "BONEAGE_NB_EPOCHS": "2", "BONEAGE_NB_SIZE": "96",
    })
    _check_outputs(summary, out, text)
    assert summary["data"] == "radiographs" and summary["n_images"] == 300
