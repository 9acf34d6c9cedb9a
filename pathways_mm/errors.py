"""Errors that users see: what is wrong and what to change."""


class ConfigError(ValueError):
    """A bad experiment config, task, plugin or checkpoint: the message says what to change."""
