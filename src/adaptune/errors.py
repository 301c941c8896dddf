"""User-facing errors.

Every problem a user can fix (bad config, bad file, bad data, wrong target names) is raised as an
``AdaptuneError`` subclass with one clear line of text. The CLI prints that line and exits non-zero
without a traceback (unless ``--debug``); library users can catch one base class.
"""

from __future__ import annotations


class AdaptuneError(Exception):
    """Base class of every error adaptune raises on purpose."""


class ConfigError(AdaptuneError, ValueError):
    """A config value is missing, of the wrong type, or out of range."""


class TargetError(AdaptuneError, ValueError):
    """``target_modules`` (or another module selector) matched nothing usable."""


class AdapterFileError(AdaptuneError, ValueError):
    """An adapter folder or file is missing, corrupt or does not fit the base model."""


class DataError(AdaptuneError, ValueError):
    """A data file is empty, unreadable or has no usable rows."""


class EnvironmentProblem(AdaptuneError, RuntimeError):
    """A needed package, device or writable directory is not available."""


class AdaptuneWarning(UserWarning):
    """adaptune changed something you asked for so that the run can go on; the text says what."""


def warn_user(message: str, stacklevel: int = 3) -> None:
    """Warn with :class:`AdaptuneWarning`; ``stacklevel`` counts from the caller of this function."""
    import warnings

    warnings.warn(message, AdaptuneWarning, stacklevel=stacklevel)
