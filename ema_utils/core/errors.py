"""The project's exceptions. Each message says what was wrong and how to fix it."""


class EmaError(Exception):
    """Base class: any error the companion raises on purpose, with a message for a person."""


class ModelError(EmaError):
    """A model cannot be found, verified or loaded."""


class AssetMissingError(ModelError):
    """A packaged asset (model weights or data) is not installed; the message names the command."""


class ChecksumError(EmaError):
    """A file's sha256 is not the pinned one; it is refused."""


class DataError(EmaError, ValueError):
    """A data file is malformed; the message names the file and the line."""


class ParameterError(EmaError, ValueError):
    """A parameter has a value that is not allowed; the message names it and the allowed values."""
