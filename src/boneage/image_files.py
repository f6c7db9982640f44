"""What the readers (``boneage.io``) and the input walkers (``boneage.inference.sources``) share: the file names
read as images, and the one lock around pydicom's global settings. A leaf module, so neither imports the other."""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Iterator

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")  # analysed whatever their content

_PYDICOM_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom's value validation warns *and logs* values such as a malformed birth date: switch it off.

    The setting is global, so DICOM reads are serialised; warnings are silenced as well.
    """
    from pydicom import config

    with _PYDICOM_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = config.settings.reading_validation_mode
        config.settings.reading_validation_mode = config.IGNORE
        try:
            yield
        finally:
            config.settings.reading_validation_mode = previous
