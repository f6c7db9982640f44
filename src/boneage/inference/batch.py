"""``boneage predict``: radiographs -> bone age, clinical interpretation, heatmap and reports, for one file or a
hospital archive of a million.

A thin adapter over the analysis pipeline (``boneage.inference.pipeline``): inputs come from sources (folders, with
``--recursive``; files; globs; DICOMDIRs), go through an engine (local worker processes, or Ray), and the records
go to writers: the table (``predictions.csv`` or ``.parquet``, appended batch by batch, so a rerun of the same command
resumes where a killed one stopped) and the reports (``--reports``). Every input ends as one row, analysed or not:
nothing is skipped without being counted. Nothing here imports torch unless the PyTorch runtime is used.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from boneage.errors import BoneAgeError
from boneage.inference.analysis import Analysis
from boneage.inference.conformal import DEFAULT_LEVEL
from boneage.inference.ensemble import Ensemble
from boneage.inference.loader import load_predictor
from boneage.inference.pipeline import (GRADCAM_MISSING, AnalysisOptions, Pipeline, cpu_count, gradcam_available,
                                        prepare_item, row_key)
from boneage.inference.progress import Run
from boneage.inference.sources import SourceItem, Skipped, open_sources
from boneage.io import DICOM_IDENTIFIERS
from boneage.report import format_table
from boneage.report.fields import CSV_COLUMNS
from boneage.report.writers import report_stem, report_writers

log = logging.getLogger("boneage.predict")
ID_COLUMNS = (*DICOM_IDENTIFIERS, "SOPInstanceUID", "path")  # table columns with --keep-identifiers only


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """Everything ``boneage predict`` does, typed: the CLI builds one from its flags (same names), code can too."""

    paths: Sequence[str]
    checkpoints: Sequence[str]
    sex: str | None = None  # "F" / "M"; None: DICOM PatientSex, else both sexes averaged
    chronological_age: str | None = None  # with its unit: "9y3m", "9.25y", "111m"
    out: str | None = None  # None: console table only
    tta: bool = True
    heatmap: bool = True
    interval_level: float = DEFAULT_LEVEL
    right_hand: bool = False
    ood_check: bool = True
    header_check: bool = True  # refuse DICOMs whose Modality / BodyPartExamined say they are no hand radiograph
    recursive: bool = False
    table: str = "csv"  # or "parquet"
    reports: str = "all"  # none | json | html | all
    batch_size: int = 16
    workers: int = -1  # processes that decode and prepare files; 0 = in this process; -1 = one per spare CPU
    device: str = "auto"
    precision: str = "fp32"  # fp16 / bf16: autocast (PyTorch checkpoints only)
    keep_identifiers: bool = False
    pseudonym_key: str | None = None  # the site key file (boneage.privacy); None: the default one
    runtime: str = "torch"  # or "onnx"
    engine: str = "local"  # or "ray"
    ray_address: str | None = None
    dicom_out: str | None = None  # an SR and a Secondary Capture per analysed DICOM input here (boneage.dicom)
    dicomweb: str | None = None  # a DICOMweb server's root URL: the inputs, instead of paths (boneage.dicom.web)
    study: str | None = None  # with dicomweb: the study (its Study Instance UID) to read
    since: str | None = None  # with dicomweb: the studies of this date (YYYY-MM-DD or YYYYMMDD) and later
    store: bool = False  # with dicomweb: send each result (SR and Secondary Capture) back with STOW-RS

    def __post_init__(self) -> None:
        from boneage.dicom.web import check_request

        check_request(self.paths, self.dicomweb, self.study, self.since, self.store)
        if self.runtime not in ("torch", "onnx"):
            raise BoneAgeError(f"runtime must be torch or onnx, not {self.runtime!r}")
        if self.batch_size < 1 or self.workers < -1:
            raise BoneAgeError(f"batch_size must be >= 1 and workers >= 0, not {self.batch_size} / {self.workers}")
        if self.table not in ("csv", "parquet"):
            raise BoneAgeError(f"--table must be csv or parquet, not {self.table!r}")
        if self.reports not in ("none", "json", "html", "all"):
            raise BoneAgeError(f"--reports must be none, json, html or all, not {self.reports!r}")
        if self.engine not in ("local", "ray"):
            raise BoneAgeError(f"--engine must be local or ray, not {self.engine!r}")

    def analysis_options(self, key: bytes) -> AnalysisOptions:
        pictures = ((self.out is not None and self.reports in ("html", "all")) or self.dicom_out is not None
                    or self.store)  # the Secondary Capture's page shows the radiograph and heatmap
        return AnalysisOptions.from_request(
            self.sex, self.chronological_age, right_hand=True if self.right_hand else None,
            keep_identifiers=self.keep_identifiers, heatmap=bool(self.heatmap and pictures),
            display=pictures, interval_level=self.interval_level,
            ood_check=self.ood_check, header_check=self.header_check, key=key)

    def worker_count(self) -> int:
        """``workers``, with -1 (auto) as one process per CPU left beside the model's (0 on one CPU, and for a
        few files given by name, where starting the processes would cost more than it saves)."""
        if self.workers != -1:
            return self.workers
        few = not self.dicomweb and len(self.paths) <= self.batch_size and all(Path(p).is_file() for p in self.paths)
        return 0 if few else max(0, min(4, cpu_count() - 1))


def check_out_dir(out: str | Path) -> Path:
    """Create ``out`` and prove it is writable, before any model loads; ``BoneAgeError`` naming the reason."""
    from boneage.atomic import writable_dir

    return writable_dir(out, "--out")


def skipped_record(skip: Skipped, options: AnalysisOptions) -> dict[str, Any]:
    from boneage.report import empty_record

    record = empty_record(row_key(skip.key, options))
    record.update(status="skipped", reason=skip.reason, error=skip.detail.replace(skip.key, record["file"]))
    return record


def run_predict(options: PredictOptions) -> int:
    """The ``predict`` command: 0 if every input was analysed or skipped as no input, 1 if any failed or was
    refused, or a result was not stored (``--store``) (``BoneAgeError``: bad arguments, before any model loads)."""
    if not options.dicomweb:
        return _predict(options, None)
    from boneage.dicom.web import download_folder

    with download_folder(check_out_dir(options.out) if options.out else None) as workdir:
        return _predict(options, workdir)


def _predict(options: PredictOptions, workdir: Path | None) -> int:
    """``run_predict``, the retrieved instances of ``--dicomweb`` in ``workdir``."""
    from boneage.privacy import load_key

    o = options
    AnalysisOptions.from_request(o.sex, o.chronological_age)  # bad --sex / --chronological-age: before any work
    out = check_out_dir(o.out) if o.out else None
    key = load_key(o.pseudonym_key)
    dicom = None
    if o.dicom_out:
        from boneage.dicom.writer import open_dicom_writer

        dicom = open_dicom_writer(o.dicom_out, o.checkpoints, key)  # checked before any model loads
    analysis_options = o.analysis_options(key)
    table = None
    if out is not None:
        from boneage.report.writers import open_table

        columns = CSV_COLUMNS + (ID_COLUMNS if o.keep_identifiers else ())
        table = open_table(out, "parquet" if o.table == "parquet" else "csv", columns)
    done = table.done() if table is not None else None
    run = Run("boneage predict", o.paths, o.recursive)
    pending = _inputs(o, analysis_options, done, run, table, workdir)
    try:
        first = next(pending, None)
    except BoneAgeError:  # a DICOMweb server that cannot be searched
        run.close()
        if table is not None:
            table.close()
        raise
    if first is None:
        run.close()
        if table is not None:
            table.close()
        if run.counts["resumed"]:
            print(f"boneage predict: nothing to do: {run.summary()} (all in {table.path if table else ''})")
            return 0
        if o.dicomweb:
            from boneage.dicom.web import public_url

            found = "" if not run.counts else f": {run.summary()}"
            raise BoneAgeError(f"no radiographs found on {public_url(o.dicomweb)} for "
                               f"{'--study' if o.study else '--since ' + str(o.since)}{found}")
        raise BoneAgeError(f"no images found in {' '.join(o.paths)} (PNG, JPEG or DICOM files, folders, globs"
                           f"{'' if o.recursive else '; add --recursive for subfolders'}): {run.summary()}")
    writers = report_writers(o.reports) if out is not None else []
    web = _dicomweb_results(o)
    try:
        model = _engine(o, analysis_options, _chain(first, pending))
        label = next(model)
        if o.heatmap and out is not None and o.reports in ("html", "all") and o.runtime != "torch":
            log.warning("no Grad-CAM heatmaps with --runtime onnx (they need PyTorch)")
        elif o.heatmap and out is not None and o.reports in ("html", "all") and not gradcam_available():
            log.warning("no Grad-CAM heatmaps: %s", GRADCAM_MISSING)
        for batch in model:
            rows = []
            for item, record, analysis in batch:
                if out is not None and writers:
                    _write_reports(out, writers, item, record, analysis, key)
                if dicom is not None:
                    dicom.write(item, record, analysis)
                rows.append(record)
                run.add(record)
            if table is not None:
                table.append([_flat(r) for r in rows])
            if web is not None:
                web.finish(batch)
    finally:
        run.close()
        if table is not None:
            table.close()
    if run.shown:
        where = f" in {table.path}" if table is not None else ""
        print(format_table(run.shown) + (f"\n... and {run.more} more rows{where}" if run.more else ""))
    print(f"model: {label}; research use only, not a certified medical device")
    rate = sum(run.counts[s] for s in ("ok", "failed", "refused")) / max(1e-9, time.monotonic() - run.start)
    print(f"boneage predict: {run.summary()} in {time.monotonic() - run.start:.0f} s ({rate:.1f} files/s)"
          + (f"; table: {table.path}" if table is not None else "")
          + (f"; reports under {out / 'reports'}" if out is not None and writers else "")
          + (f"; {dicom.summary()}" if dicom is not None else ""))
    if web is not None and web.summary():
        print(f"boneage predict: {web.summary()}")
    return 1 if run.counts["failed"] or run.counts["refused"] or (web is not None and web.failed) else 0


def _dicomweb_results(o: PredictOptions) -> Any:
    """With ``--dicomweb``: what stores the results (``--store``) and deletes the downloads after each batch."""
    if not o.dicomweb:
        return None
    from boneage.dicom.web import DicomWebResults

    return DicomWebResults(o.dicomweb, store=o.store, checkpoints=o.checkpoints)


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """A record as a table row: the identifiers (only there with --keep-identifiers) as columns of their own."""
    return {**record, **(record.get("identifiers") or {})}


def _chain(first: SourceItem, rest: Iterator[SourceItem]) -> Iterator[SourceItem]:
    yield first
    yield from rest


def sources_for(o: PredictOptions, options: AnalysisOptions, done: Any = None, workdir: Path | None = None
                ) -> Iterator[SourceItem | Skipped]:
    """What ``predict`` reads: the PATHs (``open_sources``), or with ``--dicomweb`` the server's instances,
    retrieved into ``workdir`` unless ``done`` (the table) already holds their rows (``boneage.dicom.web``)."""
    if not o.dicomweb:
        return open_sources(list(o.paths), recursive=o.recursive)
    from boneage.dicom.web import dicomweb_items

    known = None if done is None else (lambda key: _identity(SourceItem(key, None), options) in done)
    return dicomweb_items(o.dicomweb, study=o.study, since=o.since, workdir=workdir or Path("."), key=options.key,
                          known=known)


def _identity(item: SourceItem, options: AnalysisOptions) -> tuple[str, int | None, int | None]:
    """An input's resume identity as its row holds it: an unknown size or mtime (-1) is an empty cell."""
    return (row_key(item.key, options), item.size if item.size >= 0 else None,
            item.mtime_ns if item.mtime_ns >= 0 else None)


def _inputs(o: PredictOptions, options: AnalysisOptions, done: Any, run: Run, table: Any,
            workdir: Path | None = None) -> Iterator[SourceItem]:
    """The inputs still to score: skipped entries become rows at once (unless already in the table), rows
    already in the table are counted as resumed (identity as the row holds it: an unknown size or mtime empty)."""
    for entry in sources_for(o, options, done, workdir):
        if isinstance(entry, Skipped):
            if done is not None and (row_key(entry.key, options), None, None) in done:
                run.resumed()
                continue
            record = skipped_record(entry, options)
            run.add(record)
            if table is not None:
                table.append([record])
            continue
        if done is not None and _identity(entry, options) in done:
            run.resumed()
            continue
        yield entry


def _engine(o: PredictOptions, analysis_options: AnalysisOptions, items: Iterator[SourceItem]
            ) -> Iterator[Any]:
    """Yields a label of what runs the models, then batches of (input, record, analysis or None)."""
    if o.engine == "ray":
        from boneage.inference.ray_engine import ray_batches

        yield from ray_batches(o, analysis_options, items)
        return
    from boneage.inference.stream import analysed_batches

    predictor = load_predictor(list(o.checkpoints), runtime=o.runtime, tta=o.tta, device=o.device,
                               precision=o.precision)
    pipeline = Pipeline(predictor, analysis_options)
    fields = pipeline.model_fields()
    yield (f"{', '.join(fields['models'])} ({predictor.device_label})"
           + (f"; measured validation MAE {fields['model_mae_months']:.1f} months"
              if fields["model_mae_months"] is not None else ""))
    yield from analysed_batches(pipeline, items, workers=o.worker_count(), batch_size=o.batch_size)


def _write_reports(out: Path, writers: Sequence[Any], item: SourceItem, record: dict[str, Any],
                   analysis: Analysis | None, key: bytes) -> None:
    """The reports of one input; ``record["report"]`` says where, relative to ``out``."""
    named = Path(item.key).suffix.lower() in (".png", ".jpg", ".jpeg")  # DICOM names are often UIDs: never used
    hint = Path(item.key).stem if named and record.get("instance") is None else ""
    stem = report_stem(out, item.key, hint, key)
    record["report"] = stem.relative_to(out).as_posix()
    for writer in writers:
        writer.write(record, stem, analysis)


def predict_file(predictor: Ensemble, path: str | Path, *, sex: str | None = None,
                 chronological_age: str | float | None = None, right_hand: bool | None = None,
                 keep_identifiers: bool = False, heatmap: bool = True, out_dir: str | Path | None = None,
                 interval_level: float = DEFAULT_LEVEL, ood_check: bool = True, header_check: bool = True
                 ) -> dict[str, Any]:
    """Read, check and analyse one file exactly as ``boneage predict`` does; write its reports under ``out_dir``
    (if given); return the record. A bad file gives a record with ``error`` set, not an exception."""
    from boneage.inference.pipeline import Failure, failure_record

    path = Path(path)
    writes = out_dir is not None
    options = AnalysisOptions(right_hand=right_hand, keep_identifiers=keep_identifiers, heatmap=heatmap and writes,
                              display=writes, interval_level=interval_level, ood_check=ood_check,
                              header_check=header_check)
    stat = path.stat() if path.is_file() else None
    item = SourceItem(key=path.name, path=path, size=stat.st_size if stat else -1,
                      mtime_ns=stat.st_mtime_ns if stat else -1, root=str(path.parent))
    pipeline = Pipeline(predictor, options)
    try:
        options = AnalysisOptions.from_request(sex, chronological_age, **{
            f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if f.name not in ("sex", "chronological_age")})
        prepared = prepare_item(item, pipeline.configs, options)
    except BoneAgeError as exc:  # an invalid sex or age: this file's error, as for any bad input
        prepared = Failure(failure_record(item, options, f"{item.key}: {exc}", "failed", "invalid request"))
    [(_, record, analysis)] = list(pipeline.analyse([(item, prepared)]))
    if out_dir is not None:
        from boneage.privacy import load_key

        out = check_out_dir(out_dir)
        _write_reports(out, report_writers("all"), item, record, analysis, load_key())
    return record
