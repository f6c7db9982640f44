"""The DICOM results of one analysed radiograph: a Structured Report and a Secondary Capture (``result_objects``).

**SR**: a TID 1500 Measurement Report in a Comprehensive 3D SR (highdicom). One measurement group (TID 1501) on the
source image holds the bone age (LOINC 37362-1, method SNOMED CT 252956001 "Greulich and Pyle bone age
assessment", in months) with its normality, the reference population's SD and the normal range as properties, then
the prediction interval, the chronological age, the difference, the z-score, the model's measured validation MAE and
the out-of-distribution score; the category and its certainty as qualitative evaluations. A "Qualitative
Evaluations" container holds the texts: the research-use notice, the reference standard, the model and its
checkpoint hashes, the certainty sentence and the warnings. Concepts without a standard code use the private scheme
``99BONEAGE`` (``boneage.dicom.codes``), declared in the object. The algorithm (TID 4019) names the models, the
boneage version and each checkpoint's SHA-256.

**SC**: the report page (``boneage.dicom.page.render_page``) as an RGB Secondary Capture.

Both are derived objects in the source's study (StudyInstanceUID, patient, study and accession attributes copied
from the source), each in a new series, with Content Qualification RESEARCH. Their UIDs are derived from the source
instance, the checkpoints and the result, so sending the same result twice stores it once.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from boneage import __version__
from boneage.dicom import codes as c
from boneage.dicom.page import render_page
from boneage.report.schema import DISCLAIMER

HASH_HEX = 16  # the checkpoint hash as written: the first 16 hex digits of its SHA-256
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9801, 9802
MANUFACTURER = "boneage (research software)"
CHARACTER_SET = "ISO_IR 192"  # UTF-8: the texts hold dashes and a plus-minus sign
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500's container of them
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def file_sha256(path: str | Path, hex_chars: int = HASH_HEX) -> str:
    """The first ``hex_chars`` hex digits of the file's SHA-256 (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:hex_chars]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Which model wrote a result: per ensemble member its file name, architecture and checkpoint hash; the
    ensemble's measured validation MAE (months, as the record rounds it); the boneage version."""

    names: tuple[str, ...]
    architectures: tuple[str, ...]
    sha256: tuple[str, ...]
    mae_months: float | None
    version: str = __version__

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], *, architectures: Sequence[str] = (),
                   mae_months: float | None = None) -> ModelInfo:
        """From the checkpoint (or ``.onnx``) files, each hashed once here."""
        return cls(names=tuple(Path(p).name for p in paths), architectures=tuple(architectures),
                   sha256=tuple(file_sha256(p) for p in paths),
                   mae_months=None if mae_months is None else round(float(mae_months), 1))

    @classmethod
    def from_predictor(cls, predictor: Any) -> ModelInfo:
        """From a loaded ``Predictor`` / ``OnnxPredictor``: its members' files, architectures and MAE."""
        return cls.from_files([m.path for m in predictor.members],
                              architectures=[m.config.model.name for m in predictor.members],
                              mae_months=predictor.mae_months)

    def members(self) -> list[str]:
        """One line per member: ``bonenet_s a.pt sha256:0123456789abcdef``."""
        archs = self.architectures or ("",) * len(self.names)
        return [f"{a} {n} sha256:{h}".strip() for a, n, h in zip(archs, self.names, self.sha256)]

    @property
    def label(self) -> str:
        return f"boneage {', '.join(self.architectures or self.names)}"


def result_objects(record: dict[str, Any], source: Dataset, analysis: Any, *, model: ModelInfo) -> list[Dataset]:
    """[SR, SC] for an analysed record (``status`` "ok"), derived from ``source`` (the radiograph's header; no pixel
    data needed); ``analysis`` gives the pictures (``radiograph``, ``heatmap``; None: a page without them).
    ``ValueError`` (naming no identifier) for a record without a result or a source without the UIDs needed."""
    if record.get("status") != "ok" or record.get("bone_age_months") is None:
        raise ValueError(f"no result to store: the record's status is {record.get('status')!r}")
    header = _evidence(source)
    radiograph = getattr(analysis, "radiograph", None)
    heatmap = getattr(analysis, "heatmap", None)
    return [structured_report(record, header, model), secondary_capture(record, header, model, radiograph, heatmap)]


def _evidence(source: Dataset) -> Dataset:
    """The source's header with empty type-2 patient/study attributes where it lacks them (highdicom reads them)."""
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID") if k not in source]
    if missing:
        raise ValueError(f"the source DICOM lacks {', '.join(missing)}")
    header = Dataset()
    for element in source:
        if element.tag.group != 0x7FE0:  # never the pixels
            header.add(copy.deepcopy(element))
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _uid(*parts: str) -> str:
    """A UID determined by ``parts`` (pydicom's root + SHA-512 of them): the same result gets the same UIDs."""
    return str(generate_uid(entropy_srcs=["boneage", *parts]))


def _fingerprint(record: dict[str, Any], model: ModelInfo) -> str:
    keys = ("bone_age_months", "bone_age_interval_months", "interval_level", "chronological_age_months", "sex",
            "z_score", "category", "ood_score")
    return json.dumps([model.sha256, model.version, [record.get(k) for k in keys]], sort_keys=True, default=str)


def _coding_schemes() -> list[Any]:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return [CodingSchemeIdentificationItem(designator=c.PRIVATE_SCHEME, name=c.PRIVATE_SCHEME_NAME,
                                           responsible_organization=c.PRIVATE_SCHEME_OWNER)]


def _bone_age_properties(record: dict[str, Any]) -> Any:
    """TID 310 of the bone age: normality (CID 222), the reference population's SD and the normal range."""
    import highdicom.sr as sr

    props = sr.RelationshipTypeValues.HAS_PROPERTIES
    authority = record.get("reference_standard")
    stats = None
    if record.get("sd_months") is not None:
        sd = sr.NumContentItem(name=c.SD_OF_POPULATION, value=record["sd_months"], unit=c.MONTHS,
                               relationship_type=props)
        stats = sr.MeasurementStatisticalProperties(
            values=[sd], description="skeletal age at this chronological age and sex", authority=authority)
    normal_range = None
    if record.get("normal_range_months"):
        low, high = record["normal_range_months"]
        normal_range = sr.NormalRangeProperties(
            values=[sr.NumContentItem(name=c.NORMAL_RANGE_LOW, value=low, unit=c.MONTHS, relationship_type=props),
                    sr.NumContentItem(name=c.NORMAL_RANGE_HIGH, value=high, unit=c.MONTHS, relationship_type=props)],
            description="chronological age \u00b1 2 SD", authority=authority)
    category = record.get("category")
    return sr.MeasurementProperties(normality=c.NORMALITY.get(category) if category else None,
                                    measurement_statistical_properties=stats, normal_range_properties=normal_range)


def _measurements(record: dict[str, Any], model: ModelInfo) -> list[Any]:
    import highdicom.sr as sr

    bone_age = sr.Measurement(name=c.BONE_AGE, value=record["bone_age_months"], unit=c.MONTHS,
                              method=c.GP_ASSESSMENT, properties=_bone_age_properties(record))
    found = [bone_age]
    interval = record.get("bone_age_interval_months")
    mae = model.mae_months if model.mae_months is not None else record.get("model_mae_months")
    for name, value, unit in (
            (c.INTERVAL_LOW, interval[0] if interval else None, c.MONTHS),
            (c.INTERVAL_HIGH, interval[1] if interval else None, c.MONTHS),
            (c.INTERVAL_LEVEL, None if not interval else round(100 * float(record["interval_level"]), 1), c.PERCENT),
            (c.CHRONOLOGICAL_AGE, record.get("chronological_age_months"), c.MONTHS),
            (c.DIFFERENCE, record.get("difference_months"), c.MONTHS),
            (c.Z_SCORE, record.get("z_score"), c.Z_UNIT),
            (c.MODEL_MAE, mae, c.MONTHS),
            (c.OOD_SCORE, record.get("ood_score"), c.RATIO)):
        if value is not None:
            found.append(sr.Measurement(name=name, value=float(value), unit=unit))
    return found


def _evaluations(record: dict[str, Any]) -> list[Any]:
    import highdicom.sr as sr

    found = [sr.QualitativeEvaluation(c.SEX, c.SEX_VALUES.get(record.get("sex"), c.SEX_VALUES[None]))]
    if record.get("category"):
        found.append(sr.QualitativeEvaluation(c.CATEGORY, c.CATEGORY_VALUES[record["category"]]))
    certainty = c.certainty_code(record.get("category_certainty"))
    if certainty is not None:
        found.append(sr.QualitativeEvaluation(c.CERTAINTY, certainty))
    return found


def _texts(record: dict[str, Any], model: ModelInfo) -> Any:
    """TID 1500's "Qualitative Evaluations" container: the notice, the standard, the model, certainty, warnings."""
    import highdicom.sr as sr

    contains = sr.RelationshipTypeValues.CONTAINS
    texts = [(c.NOTICE, DISCLAIMER), (c.REFERENCE_STANDARD, record.get("reference_standard")),
             *((c.MODEL, line) for line in model.members()),
             (c.CERTAINTY_TEXT, record.get("category_certainty")),
             *((c.WARNING, w) for w in record.get("warnings") or [])]
    container = sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = sr.ContentSequence(
        [sr.TextContentItem(name=name, value=str(value), relationship_type=contains) for name, value in texts
         if value])
    return container


def structured_report(record: dict[str, Any], header: Dataset, model: ModelInfo) -> Dataset:
    """The TID 1500 Measurement Report of ``record`` on the image ``header`` (see the module doc)."""
    import highdicom.sr as sr

    fingerprint = _fingerprint(record, model)
    algorithm = sr.AlgorithmIdentification(name=model.label, version=model.version, parameters=model.members())
    group = sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=sr.TrackingIdentifier(uid=_uid(header.SOPInstanceUID, fingerprint, "tracking"),
                                                  identifier="bone age"),
        algorithm_id=algorithm, finding_sites=[sr.FindingSite(c.HAND)],
        measurements=_measurements(record, model), qualitative_evaluations=_evaluations(record),
        source_images=[sr.SourceImageForMeasurementGroup.from_source_image(header)])
    device = sr.DeviceObserverIdentifyingAttributes(
        uid=_uid("device"), name="boneage", manufacturer_name=MANUFACTURER,
        model_name=model.label[:64], role_in_procedure=None)
    context = sr.ObservationContext(observer_device_context=sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device, observer_identifying_attributes=device))
    report = sr.MeasurementReport(observation_context=context, procedure_reported=c.GP_ASSESSMENT,
                                  imaging_measurements=[group])
    report[0].ContentSequence.append(_texts(record, model))
    return sr.Comprehensive3DSR(
        evidence=[header], content=report[0],
        series_instance_uid=_uid(header.StudyInstanceUID, *model.sha256, "SR series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=_uid(header.SOPInstanceUID, fingerprint, "SR"),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="Bone age SR (research use only)", manufacturer_model_name=model.label[:64],
        software_versions=f"boneage {model.version}", content_qualification="RESEARCH",
        coding_schemes=_coding_schemes(), specific_character_set=CHARACTER_SET,
        transfer_syntax_uid=ExplicitVRLittleEndian)


def secondary_capture(record: dict[str, Any], header: Dataset, model: ModelInfo,
                      radiograph: np.ndarray | None = None, heatmap: np.ndarray | None = None) -> Dataset:
    """The report page (``render_page``) as an RGB Secondary Capture in the source's study, in a new series."""
    from highdicom.sc import SCImage

    fingerprint = _fingerprint(record, model)
    page = render_page(record, radiograph, heatmap)
    sc = SCImage.from_ref_dataset(
        ref_dataset=header, pixel_array=page, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "F"),
        series_instance_uid=_uid(header.StudyInstanceUID, *model.sha256, "SC series"),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=_uid(header.SOPInstanceUID, fingerprint, "SC"),
        instance_number=1, manufacturer=MANUFACTURER, series_description="Bone age report (research use only)",
        manufacturer_model_name=model.label[:64], software_versions=f"boneage {model.version}",
        content_qualification="RESEARCH", specific_character_set=CHARACTER_SET,
        transfer_syntax_uid=ExplicitVRLittleEndian)
    setattr(sc, "PatientOrientation", None)  # a report page has no anatomical orientation (type 2: empty)
    side = header.get("Laterality") or header.get("ImageLaterality")
    setattr(sc, "Laterality", side if side in ("L", "R") else None)  # the source's hand, if it says (type 2C)
    sc.BurnedInAnnotation = "NO"  # the page shows results, no identifier
    sc.DerivationDescription = "Bone age report page rendered by boneage; research use only"
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


def model_info(predictor: Any) -> ModelInfo:
    """``ModelInfo.from_predictor``: which model a loaded predictor is (its checkpoint files hashed once, here)."""
    return ModelInfo.from_predictor(predictor)
