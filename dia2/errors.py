"""Named errors of the dia2 runtime. Each message says what was wrong and, where it can, what to do."""

from __future__ import annotations


class Dia2Error(Exception):
    """Base class: anything the runtime rejects on purpose (bad input, bad files)."""


class ConfigError(Dia2Error):
    """config.json is missing a key, has a wrong type or an inconsistent value."""


class CheckpointError(Dia2Error):
    """A model folder or weights file is missing, corrupt, or does not match the config."""


class ScriptError(Dia2Error):
    """The text script cannot be generated (empty, unknown speaker tag, too long)."""


class PromptError(Dia2Error):
    """Voice prompt audio or its word timings are unusable."""


class SnapshotError(Dia2Error):
    """A voice snapshot is corrupt or was made for another model or format."""


class StreamError(Dia2Error):
    """A stream was used in a way its lifecycle does not allow (e.g. text after close)."""
