"""The user-error types every layer raises: the bottom of the import graph, so the model, the data and the
config schema can all raise them without importing one another.

`UserError` is the one base the command line turns into a single line on stderr and exit status 2 (see
`maxlm.cli.run`); anything else is a bug and keeps its traceback. Every module's own error type (a bad
base model, an unreadable benchmark, a bad generation request, ...) derives from it, so a mistake reported
by any layer reads the same on every command.
"""


class UserError(ValueError):
    """A mistake in what the user asked for or gave (config, files, data): one line, no traceback."""


class ConfigError(UserError):
    """A user mistake in a config: carries the dotted key so the CLI can print one clear line."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"invalid config: {key}: {reason}")
        self.key = key
        self.reason = reason


class InputError(UserError):
    """An input that cannot be read at all (no file matches, a missing decompressor, a corrupt archive, no
    readable document): one line for the user."""


class WorkdirError(UserError):
    """A workdir that cannot be used as asked -- another run writes it, or it holds a different run: one line
    for the user, and nothing in the workdir is touched."""
