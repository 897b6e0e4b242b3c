"""The user-error type every layer raises for a bad config value: the bottom of the import graph, so the
model, the data and the config schema can all raise it without importing one another."""


class ConfigError(ValueError):
    """A user mistake in a config: carries the dotted key so the CLI can print one clear line."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"invalid config: {key}: {reason}")
        self.key = key
        self.reason = reason


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked -- another run writes it, or it holds a different run: one line
    for the user, and nothing in the workdir is touched."""
