"""User-facing errors.

Every problem a user can cause (bad config, missing or corrupt data, unwritable store, a
diverging training) is raised as an :class:`ArtStudyError`. The CLI prints its message on one
line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class ArtStudyError(Exception):
    """A problem with the user's input or environment, reported as one line."""


class ConfigError(ArtStudyError):
    """The study configuration is invalid."""


class DataError(ArtStudyError):
    """MNIST could not be found, downloaded or verified."""


class TrackingError(ArtStudyError):
    """The MLflow store cannot be used."""


class TrainingError(ArtStudyError):
    """Training diverged (NaN loss) or otherwise failed for a reason the user can act on."""
