"""DICOM outputs of an analysis, for the patient's record in a PACS (``boneage predict ... --dicom-out DIR``).

For every analysed DICOM input, two derived objects in the source's study, each in a new series:

- ``boneage.dicom.sr``: the result as a DICOM Structured Report (TID 1500 Measurement Report, Comprehensive 3D
  SR): the bone age and its prediction interval, the Greulich & Pyle comparison, the model and its measured error,
  the out-of-distribution score and the research-use notice, as coded, machine-readable content items; and the
  Secondary Capture of the report page. ``ModelInfo`` says which model wrote them.
- ``boneage.dicom.codes``: the coded concepts (LOINC, SNOMED CT, DICOM and this project's private scheme
  ``99BONEAGE``) that the SR uses; ``docs/pacs.md`` lists them.
- ``boneage.dicom.page``: the report page drawn with Pillow (``render_page``), for the Secondary Capture.
- ``boneage.dicom.writer``: ``DicomWriter``, which writes both files per input for ``boneage predict``.

The objects carry the source's patient and study attributes by design (they belong in the patient's record); no
log line or exception message of this package carries them. Needs the ``[pacs]`` extra (highdicom).
"""
