"""The project's own error types: every bad input ends in one of these, with a one-line message."""


def first_line(error: BaseException) -> str:
    """An exception's message on one line (its type's name where it has none), for a message of ours."""
    return (str(error).strip().splitlines() or [""])[0] or type(error).__name__


class BCError(Exception):
    """Base class: the CLI prints ``str(error)`` on one line and exits non-zero."""


class DataError(BCError):
    """A data folder or IDX file is missing, truncated, corrupt or inconsistent."""


class FormatError(BCError):
    """A ``.bcz`` compressed-model file is truncated, corrupt or of an unknown version."""


class CheckpointError(BCError):
    """A checkpoint is missing, corrupt, or belongs to another model or prior."""


class ConfigError(BCError):
    """An option, model name, model file or threshold list is not usable."""


class TrainingDiverged(BCError):
    """The ELBO or a parameter became NaN or infinite during training."""
