"""Shared command-line plumbing: `--config=configs/x.py --config.a.b=v` flags and one-line user errors.

Every entry point (`python -m maxlm.train`, `maxlm.sample`, ...) is a few lines on top of this. User
mistakes -- an invalid config value, an unknown key, a missing file or checkpoint -- print one line on
stderr and exit with status 2; a traceback is kept for real bugs.
"""

from __future__ import annotations

import difflib
import errno
import os
import sys
import traceback
from typing import Callable

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from maxlm.config import ConfigError, default_config
from maxlm.errors import UserError

USER_ERRORS = (UserError, FileNotFoundError)
"""Exceptions that are the user's mistake wherever they are raised: one line, exit 2."""

# What the machine refuses rather than what the code gets wrong: a path that is a file, a read-only or full
# disk, no permission. They come from whichever layer touched the file first, so they are caught here.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                                errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG})


def environment_error(e: BaseException) -> OSError | None:
    """The OSError of the machine refusing a file operation behind `e` (itself, or its cause or context:
    Orbax and tensorstore wrap the original), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def one_line(e: BaseException) -> str:
    """The message of a user error on one line."""
    if isinstance(e, OSError) and e.strerror:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        text = f"{e.strerror}: {where}" if where else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def define_config_flag(default: str = "configs/tiny.py", schema: Callable[[], ConfigDict] = default_config) -> None:
    """The `--config` flag; `schema` (the training schema unless given) is what `--config.*` keys are
    checked against."""
    # ml_collections applies `--config.*` overrides from sys.argv as soon as the flag with a default file is
    # defined, so the schema check has to come first.
    _exit_on_config_error(check_overrides, sys.argv, schema)
    config_flags.DEFINE_config_file(
        "config", default,
        "Experiment config: a configs/*.py file with get_config(). Override any field with "
        "--config.<section>.<key>=<value>, e.g. --config.model.num_layers=4 --config.train.num_steps=100.",
        lock_config=True)


def run(main: Callable[[list[str]], None], user_errors: tuple[type[Exception], ...] = (),
        schema: Callable[[], ConfigDict] = default_config) -> None:
    """`absl.app.run(main)`, turning user errors (USER_ERRORS + `user_errors`) into one line on stderr, exit 2.
    `schema` is the one `define_config_flag` was given."""

    def wrapped(argv: list[str]) -> None:
        if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep the console readable
            logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except Exception as e:  # noqa: BLE001  (re-raised unless it is the user's mistake)
            cause = e if isinstance(e, USER_ERRORS + tuple(user_errors)) else environment_error(e)
            if cause is None:
                raise
            if flags.FLAGS["verbosity"].present:  # --verbosity asks for the whole story
                traceback.print_exc()
            print(f"error: {one_line(cause)}", file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(wrapped, flags_parser=lambda argv: _parse_flags(argv, schema))


def _exit_on_config_error(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def check_overrides(argv: list[str], schema: Callable[[], ConfigDict] = default_config) -> None:
    """Fail on `--config=missing.py` and on `--config.a.b` keys that are not in the schema, naming the key."""
    schema = schema()
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            if not os.path.isfile(path):
                raise ConfigError("config", f"no such config file: {path}")
        elif arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            node = schema
            for i, part in enumerate(key.split(".")):
                if not isinstance(node, ConfigDict) or part not in node:
                    known = list(node.keys()) if isinstance(node, ConfigDict) else []
                    close = difflib.get_close_matches(part, known, n=1)
                    hint = f"; did you mean {'.'.join(key.split('.')[:i] + close)}?" if close else ""
                    raise ConfigError(key, f"no such key in the config schema (maxlm/config.py){hint}")
                node = node[part]


def _parse_flags(argv: list[str], schema: Callable[[], ConfigDict]) -> list[str]:
    """absl's parser, but a bad flag, unknown config key or missing config file is one line, not a traceback."""
    _exit_on_config_error(check_overrides, argv, schema)
    try:
        rest = flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001  (parsing runs the config file: any error there is the user's)
        where = _config_file_frame(e, argv)
        message = " ".join(str(e).replace("\\n", " ").split())
        if where:
            message = f"the config file {where} raised {type(e).__name__}: {message}"
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)
    if "config" in flags.FLAGS and not isinstance(flags.FLAGS["config"].value, ConfigDict):
        value = flags.FLAGS["config"].value
        path = getattr(flags.FLAGS["config"], "config_filename", "")
        print(f"error: invalid config: get_config() in {path or 'the config file'} returned a {type(value).__name__}, "
              "not an ml_collections ConfigDict", file=sys.stderr, flush=True)
        sys.exit(2)
    return rest


def _config_file_frame(e: BaseException, argv: list[str]) -> str:
    """'path:line' where the `--config` file raised `e` (or its SyntaxError's place), else ""."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}"
    files = {os.path.abspath(a.split("=", 1)[1]) for a in argv if a.startswith("--config=")}
    lines = [f"{f.filename}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(f.filename) in files]
    return lines[-1] if lines else ""
