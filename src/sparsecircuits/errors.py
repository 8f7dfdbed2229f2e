"""Error types whose message is a single line a user can act on.

Every problem caused by user input (a file, a config field, a corpus) raises a subclass of
:class:`SparseCircuitsError`; the CLI prints its message on one line and exits with status 2.
"""

from __future__ import annotations


class SparseCircuitsError(ValueError):
    """Base class: bad user input, reported as one line naming the file/field and the fix."""

    def __init__(self, message: str) -> None:
        # One line, always: multi-line messages get folded so logs and terminals stay tidy.
        super().__init__(" ".join(str(message).split()))


class ConfigError(SparseCircuitsError):
    """A config file or field is missing, unknown, or of the wrong type/value."""


class CheckpointError(SparseCircuitsError):
    """A checkpoint directory or file is missing, truncated or inconsistent."""


class DataError(SparseCircuitsError):
    """A corpus, tokenizer or token cache cannot be used."""


class InputError(SparseCircuitsError):
    """A runtime input (e.g. a token sequence) is out of range for the model."""


class DownloadError(SparseCircuitsError):
    """An artefact cannot be fetched: unreachable, missing there, or not the expected bytes."""
