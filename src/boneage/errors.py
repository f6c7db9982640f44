"""Errors a user can cause. The CLI prints them as one line on stderr and exits non-zero."""


class BoneAgeError(Exception):
    """Base class: the message names the file/row, what is wrong and what to do."""


def about_file(path: object, exc: BaseException) -> str:
    """``exc``'s message for a per-file error record: prefixed with ``path`` unless it already names it."""
    message = str(exc)
    return message if str(path) in message else f"{path}: {message}"


class DataError(BoneAgeError):
    """A labels file or image folder is malformed."""


class ImageReadError(BoneAgeError):
    """A file could not be decoded as a radiograph."""


class UnusableImageError(BoneAgeError):
    """A file decoded, but is not a usable hand radiograph (blank, colour photo, tiny...)."""


class ConfigError(BoneAgeError):
    """A config file or override is invalid."""


class CheckpointError(BoneAgeError):
    """A checkpoint file is missing, corrupt or incompatible."""


class TrainingDiverged(BoneAgeError):
    """The loss stopped being a number, or the validation error exploded: the run is stopped, not saved."""


class OutOfDistributionError(UnusableImageError):
    """The model's features put the image far from every training radiograph (``boneage.inference.ood``)."""


class HeaderRefusedError(BoneAgeError):
    """A DICOM header says the file is not a hand radiograph (``boneage.inference.header_check``).

    ``reason`` is a short category for counting, e.g. "header: modality CT", "header: body part CHEST".
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable (worker processes) with its reason
        return type(self), (str(self), self.reason)
