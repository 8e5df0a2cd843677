"""What the command-line tools (train.py, decode.py, convert.py) share: flags parsed with one-line
errors, one log format, and a user's mistake reported as one ERROR line with exit status 1.

    if __name__ == "__main__":
        cli.run(main, define_flags, "decode", errors=(DataError, ...))

A mistake never prints a traceback or the whole usage text: the line names the flag, file or
value and what was expected. ``--help`` still prints the usage.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from collections.abc import Callable

from absl import app, flags

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Loggers that speak for their libraries at INFO: on a CPU machine JAX says once per process that
# it could not start a TPU backend, which is expected and says nothing to a user.
QUIET_LOGGERS = ("absl", "jax._src.xla_bridge", "orbax")


class UsageError(Exception):
    """A flag a tool cannot use: reported as one line, exit status 1."""


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def fail(log_name: str, message: str, code: int = 1):
    """Logs ``message`` as one ERROR line (newlines folded) and exits with ``code``."""
    logging.getLogger(log_name).error("%s", " ".join(str(message).split("\n")))
    sys.exit(code)


class HeldLogs:
    """Holds back the log lines of a tool's checks, so that a refused start prints its ERROR
    line alone: ``with HeldLogs(refusals) as held: ...; held.release()``.

    ``release()`` (once the checks passed) prints what was held and lets later lines through.
    Leaving the block without it prints what was held as well, unless the block ended with one
    of ``refusals`` (the errors that become one ERROR line) or an interrupt: then the held
    lines are dropped.
    """

    def __init__(self, refusals: tuple[type[BaseException], ...] = ()):
        self.refusals = (UsageError, KeyboardInterrupt, SystemExit, *refusals)
        self.records: list[logging.LogRecord] = []
        self._handlers: list[logging.Handler] | None = None

    def __enter__(self) -> HeldLogs:
        root = logging.getLogger()
        self._handlers, root.handlers = root.handlers[:], [_Collect(self.records)]
        return self

    def release(self, print_held: bool = True) -> None:
        if self._handlers is None:
            return
        root = logging.getLogger()
        root.handlers, self._handlers = self._handlers, None
        for record in self.records if print_held else ():
            root.callHandlers(record)
        self.records.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(print_held=not (exc is not None and isinstance(exc, self.refusals)))


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run(
    main: Callable[[], None],
    define_flags: Callable[[], None],
    log_name: str,
    errors: tuple[type[BaseException], ...] = (),
) -> None:
    """Defines and parses the flags, then runs ``main()``; ``UsageError`` and ``errors`` raised by
    either become one ERROR line and exit status 1."""
    define_flags()

    def parse(argv: list[str]) -> list[str]:
        configure_logging()  # here: absl.app puts its own handler in place before parsing
        missing = missing_config_file(argv)
        if missing:
            fail(log_name, missing)
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as err:
            fail(log_name, f"{err}; see --help")
        except (AttributeError, KeyError) as err:  # ml_collections: an unknown config field
            fail(log_name, unknown_config_field(argv, err))
        if len(rest) > 1:
            fail(
                log_name,
                f"unexpected argument {rest[1]!r}: every input is a flag (for example "
                f"--input={rest[1]}); see --help",
            )
        return rest

    def entry(argv: list[str]) -> None:
        del argv
        configure_logging()  # again: absl.app sets its verbosity after parsing
        # SIGTERM unwinds like Ctrl-C, so a tool's `finally` blocks (a temporary output file
        # removed, a lock released) run; training installs its own handler on top.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            main()
        except (UsageError, *errors) as err:
            fail(log_name, str(err))
        except KeyboardInterrupt:
            fail(log_name, "interrupted", code=130)

    app.run(entry, flags_parser=parse)


def _raise_keyboard_interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt


def missing_config_file(argv: list[str]) -> str | None:
    """The one line for a config-file flag (``--config=PATH``) naming no file, or None.

    ml_collections loads the file lazily and reports a missing one as a long traceback when the
    config is first used; this looks before the flags are parsed.
    """
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    for name in list(flags.FLAGS):
        if not isinstance(flags.FLAGS[name].parser, ConfigFileFlagParser):
            continue
        for i, arg in enumerate(argv[1:], 1):
            if arg.startswith(f"--{name}="):
                value = arg.split("=", 1)[1]
            elif arg == f"--{name}" and i + 1 < len(argv):
                value = argv[i + 1]
            else:
                continue
            path = value.split(":", 1)[0]  # PATH:ARGUMENT passes ARGUMENT to get_config
            if not os.path.isfile(path):
                what = "a directory" if os.path.isdir(path) else "no such file"
                return (
                    f"--{name}={value}: {what}; expected a config file such as "
                    "configs/default.py (every field and its meaning: configs/common.py)"
                )
    return None


def unknown_config_field(argv: list[str], err: BaseException) -> str:
    """The one line for ``--config.NAME=...`` naming a field the config does not have."""
    # ml_collections raises KeyError("'name'\nDid you mean \"x\" instead of \"name\"?"),
    # wrapped in an AttributeError.
    text = str(err).replace("\\n", "\n").replace("\\'", "'")
    name = text.split("\n")[0].strip("\"' ")
    fields = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    flag = next((f for f in fields if name in f.split(".")), None)
    message = f"{flag or '--config'}: the config has no field {name!r}"
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    if suggestion:
        message += f"; did you mean {suggestion.group(1)!r}?"
    return message + " (the fields and their meaning: configs/common.py)"
