"""The one owner of the per-image work: prepare -> infer -> explain -> finish.

``boneage predict`` (files and archives, local or on Ray), ``boneage serve`` (uploads) and ``predict_array``
(an array in memory) are thin adapters over ``Pipeline``:

- **prepare** (``prepare_item``, a plain function so worker processes can run it): decode the file
  (``boneage.io.read_image``), refuse what the DICOM header says is no hand radiograph (``header_check``), the
  quality gate, then the one preprocessing path once per distinct preprocessing config of the ensemble, and the
  heatmap's display view cut with the same box (``analysis.prepare``);
- **infer** (``Pipeline.infer``): a batch through the ensemble: each view through the encoder once, the head once
  per sex it needs, the out-of-distribution features from the same pass (``Ensemble.infer``);
- **explain** (``Pipeline.explain``): Grad-CAM on the already-preprocessed tensor (PyTorch runtime only);
- **finish** (``analysis.finish``): the estimate, interval and interpretation: the record.

Inputs come from sources (``boneage.inference.sources``); records and pictures go to writers
(``boneage.report.writers``). A file that cannot be analysed becomes its record with ``status`` and ``error`` set:
one file never stops a batch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterator, Sequence, cast

import numpy as np

from boneage.errors import BoneAgeError, HeaderRefusedError, OutOfDistributionError, UnusableImageError, about_file
from boneage.inference.analysis import _MALE, Analysis, Pending, _model_fields, finish, parse_request, prepare
from boneage.inference.conformal import DEFAULT_LEVEL
from boneage.inference.ensemble import Ensemble
from boneage.inference.header_check import check_header
from boneage.inference.sources import SourceItem
from boneage.io import ImageMeta, read_image
from boneage.privacy import pseudonym, public_path
from boneage.report import empty_record
from boneage.report.schema import printable

GRADCAM_MISSING = "the grad-cam package is not installed (pip install 'boneage[gradcam]')"


def gradcam_available() -> bool:
    """Whether the optional ``grad-cam`` package (the ``[gradcam]`` extra) can be imported."""
    return importlib.util.find_spec("pytorch_grad_cam") is not None


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """What every image of a run shares: the request (sex, chronological age as parsed by ``parse_request``), what
    to keep and draw, and the checks. Plain values: it travels to worker processes and Ray actors."""

    sex: str | None = None  # "M" / "F"; None: the DICOM header's, else both sexes
    chronological_age: float | None = None  # months; None: the DICOM header's
    right_hand: bool | None = None  # None: DICOM laterality decides
    keep_identifiers: bool = False
    heatmap: bool = False
    display: bool = True  # keep the radiograph for the HTML report
    interval_level: float = DEFAULT_LEVEL
    ood_check: bool = True
    header_check: bool = True
    key: bytes = b""  # the site's pseudonym key (``boneage.privacy``); empty: no pseudonyms

    @classmethod
    def from_request(cls, sex: str | None, chronological_age: str | float | None, **kwargs: Any) -> AnalysisOptions:
        """Options from a user's sex and age text (``BoneAgeError`` if invalid)."""
        sex_code, ca = parse_request(sex, chronological_age)
        return cls(sex=sex_code, chronological_age=ca, **kwargs)


@dataclasses.dataclass
class Failure:
    """An input that was not analysed: its record (``status``, ``reason`` and ``error`` set)."""

    record: dict[str, Any]


def _category(exc: BoneAgeError) -> tuple[str, str]:
    """(status, reason) of an error, for counting."""
    if isinstance(exc, HeaderRefusedError):
        return "refused", exc.reason
    if isinstance(exc, OutOfDistributionError):
        return "refused", "out of distribution"
    if isinstance(exc, UnusableImageError):
        return "failed", "unusable image"
    from boneage.errors import ImageReadError

    if isinstance(exc, ImageReadError):
        return "failed", "unreadable"
    return "failed", "invalid request"


def row_key(key: str, options: AnalysisOptions) -> str:
    """What the table's ``file`` holds for the input ``key``: the relative path, its DICOM-UID components
    pseudonymised (``boneage.privacy.public_path``) unless identifiers are kept. The resume identity."""
    return key if options.keep_identifiers or not options.key else public_path(key, options.key)


def base_record(item: SourceItem, options: AnalysisOptions, meta: ImageMeta | None = None,
                record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields every row of ``item`` carries, analysed or not: its key, size and time, the pseudonym and,
    only with ``keep_identifiers``, the identifiers (the absolute path among them)."""
    record = record if record is not None else empty_record(row_key(item.key, options))
    record.update(file=printable(row_key(item.key, options)), file_size=item.size if item.size >= 0 else None,
                  file_mtime_ns=item.mtime_ns if item.mtime_ns >= 0 else None)
    if meta is not None and meta.instance_uid and options.key:
        record["instance"] = pseudonym(meta.instance_uid, options.key)
    if options.keep_identifiers:
        ids = dict(meta.identifiers) if meta is not None else {}
        if meta is not None and meta.instance_uid:
            ids["SOPInstanceUID"] = meta.instance_uid
        if item.path is not None:
            ids["path"] = printable(str(Path(item.path).absolute()))
        record["identifiers"] = ids or None
    return record


def failure_record(item: SourceItem, options: AnalysisOptions, message: str, status: str, reason: str,
                   meta: ImageMeta | None = None) -> dict[str, Any]:
    """The record of an input that was not analysed; the message never holds the absolute path."""
    record = base_record(item, options, meta)
    if item.path is not None:
        message = message.replace(str(item.path), item.key)
    message = message.replace(item.key, row_key(item.key, options))
    record.update(status=status, reason=reason, error=" ".join(printable(message).split()))
    return record


def prepare_item(item: SourceItem, configs: Sequence[Any], options: AnalysisOptions) -> Pending | Failure:
    """Worker step: decode, header check, quality gate and preprocessing of one input; never raises for the input."""
    meta = None
    try:
        if item.path is None:
            raise BoneAgeError(f"{item.key}: no file to read")
        image, meta = read_image(item.path, right_hand=options.right_hand, keep_identifiers=options.keep_identifiers)
        if options.header_check:
            check_header(meta)
        meta.path = item.key
        pending = prepare(configs, image, meta, sex=options.sex, chronological_age=options.chronological_age,
                          display=options.display, cam_view=options.heatmap)
    except BoneAgeError as exc:
        status, reason = _category(exc)
        return Failure(failure_record(item, options, about_file(item.key, exc), status, reason, meta))
    except Exception as exc:  # noqa: BLE001 - one file must not end the batch
        return Failure(failure_record(item, options, f"{item.key}: unexpected error ({type(exc).__name__}: {exc})",
                                      "failed", "unexpected error", meta))
    base_record(item, options, meta, pending.record)
    return pending


class Pipeline:
    """An ensemble and the run's options: infer, explain and finish prepared images, one batch at a time."""

    def __init__(self, predictor: Ensemble, options: AnalysisOptions) -> None:
        self.predictor, self.options = predictor, options
        self.configs = list(predictor.preprocess_configs)
        self.draws = bool(options.heatmap and predictor.runtime == "torch" and gradcam_available())

    def prepare(self, item: SourceItem) -> Pending | Failure:
        return prepare_item(item, self.configs, self.options)

    def infer(self, items: Sequence[Pending]) -> list[tuple[float, float | None, float | None]]:
        """Per image: (months as given / as male, months as female or None, out-of-distribution score or None)."""
        if not items:
            return []
        stacked = {i: np.concatenate([it.by_config[i] for it in items]) for i in range(len(self.configs))}
        male = np.array([np.nan if it.male is None else it.male for it in items], np.float32)
        out = self.predictor.infer(stacked, male)
        return [(float(out.as_given[k]), None if np.isnan(out.as_female[k]) else float(out.as_female[k]),
                 None if out.ood is None else float(out.ood[k])) for k in range(len(items))]

    def explain(self, pending: Pending, record: dict[str, Any]) -> np.ndarray | None:
        """The Grad-CAM overlay of an analysed image over its display view, or None with the reason as a note."""
        if not self.options.heatmap:
            return None
        notes: list[str] = record["warnings"]
        if self.predictor.runtime != "torch":
            notes.append("no heatmap: Grad-CAM needs the PyTorch runtime")
            return None
        if not self.draws:
            notes.append(f"no heatmap: {GRADCAM_MISSING}")
            return None
        from boneage.inference.gradcam import heatmap_overlay

        return heatmap_overlay(cast(Any, self.predictor), pending.by_config[0][0], cast(np.ndarray, pending.cam_view),
                               pending.male)

    def finish(self, pending: Pending, outputs: tuple[float, float | None, float | None]) -> Analysis:
        record = finish(self.predictor, pending, outputs, interval_level=self.options.interval_level,
                        ood_check=self.options.ood_check)
        overlay = self.explain(pending, record)
        return Analysis(record, pending.display, overlay)

    def analyse(self, prepared: Sequence[tuple[SourceItem, Pending | Failure]]
                ) -> Iterator[tuple[SourceItem, dict[str, Any], Analysis | None]]:
        """A batch of prepared inputs -> (item, record, analysis or None), in order; failures become records."""
        ready = [p for _, p in prepared if isinstance(p, Pending)]
        failure = None
        try:
            outputs = iter(self.infer(ready))
        except Exception as exc:  # noqa: BLE001 - the batch's files get the error; the next batch goes on
            failure = f"unexpected error ({type(exc).__name__}: {exc})"
        for item, p in prepared:
            if isinstance(p, Failure):
                yield item, p.record, None
                continue
            if failure is not None:
                yield item, failure_record(item, self.options, f"{item.key}: {failure}", "failed",
                                           "unexpected error", p.meta), None
                continue
            try:
                analysis = self.finish(p, next(outputs))
                yield item, analysis.record, analysis
            except BoneAgeError as exc:
                status, reason = _category(exc)
                yield item, failure_record(item, self.options, about_file(item.key, exc), status, reason,
                                           p.meta), None
            except Exception as exc:  # noqa: BLE001 - a batch goes on past anything one file can cause
                yield item, failure_record(item, self.options, f"{item.key}: unexpected error "
                                           f"({type(exc).__name__}: {exc})", "failed", "unexpected error",
                                           p.meta), None

    def model_fields(self) -> dict[str, Any]:
        return _model_fields(self.predictor)


def predict_array(predictor: Ensemble, image: np.ndarray, meta: ImageMeta | None = None, *,
                  sex: str | None = None, chronological_age: str | float | None = None,
                  heatmap: bool = True, interval_level: float = DEFAULT_LEVEL, ood_check: bool = True) -> Analysis:
    """Analyse a decoded radiograph (``read_image`` output, or any 2-D uint8/uint16 array) in memory.

    ``sex``/``chronological_age`` override the DICOM header in ``meta``. Raises ``BoneAgeError``
    (``UnusableImageError``, ``OutOfDistributionError`` unless ``ood_check`` is off, invalid sex/age);
    the heatmap needs the PyTorch runtime. The same steps as ``Pipeline.analyse`` on a batch of one."""
    options = AnalysisOptions.from_request(sex, chronological_age, heatmap=heatmap, interval_level=interval_level,
                                           ood_check=ood_check)
    pipeline = Pipeline(predictor, options)
    pending = prepare(pipeline.configs, image, meta, sex=options.sex, chronological_age=options.chronological_age,
                      cam_view=heatmap)
    pending.record["identifiers"] = (meta.identifiers or None) if meta is not None else None
    return pipeline.finish(pending, pipeline.infer([pending])[0])


def male_code(sex: str | None) -> float | None:
    """1.0 / 0.0 / None for "M" / "F" / unknown."""
    return None if sex is None else _MALE[sex]


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
