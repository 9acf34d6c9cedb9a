"""Errors that users see: what is wrong and what to change."""


class ConfigError(ValueError):
    """A bad experiment config, task, plugin or checkpoint: the message says what to change."""


class TrainingAborted(RuntimeError):
    """A run stopped on a fault it cannot recover from in-process (a rank that stopped answering,
    too many non-finite steps); the message says what happened, where, and how to continue."""
