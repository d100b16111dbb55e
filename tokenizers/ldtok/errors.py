"""User-facing failures: one line naming the file, key or value and what to do, an exit code, no traceback.

Library code raises :class:`LdtokError` (or a subclass) for anything a user can fix: bad data, a damaged checkpoint,
a shard directory of another model, a run that diverged. Entry points (``ldtok ...``, ``train/*.py``) run their
``main`` through :func:`run_cli`, which prints ``error: <message>`` and exits with the error's ``exit_code``. The
traceback is shown only with ``LDTOK_DEBUG=1`` in the environment (or ``--debug`` on the command line).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable


class LdtokError(Exception):
    """A failure the user can act on; the message is one line that says what is wrong and what to do.

    Args:
        message (`str`): the one-line message.
        exit_code (`int`, *optional*, defaults to 1): the process exit status `run_cli` uses (2 for usage/config).
    """

    exit_code = 1
    label = "error"  # what `run_cli` prints before the message

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class DiskFullError(LdtokError):
    """Writing a file failed because the disk (or quota) is full."""


def debug_enabled(argv: list[str] | None = None) -> bool:
    """`LDTOK_DEBUG=1` in the environment, or `--debug` among `argv`."""
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get("LDTOK_DEBUG", "") not in ("", "0") or "--debug" in argv


def disk_full_error(error: OSError, path: str | os.PathLike) -> DiskFullError | None:
    """A `DiskFullError` naming `path` when `error` is ENOSPC/EDQUOT, else `None`."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full while writing {path}: free some space on that disk (or choose another "
                             "output directory) and rerun the same command; nothing written so far is lost")
    return None


def run_cli(main: Callable[[], int | None]) -> None:
    """Run an entry point's `main()`; user errors become `error: ...` on stderr and an exit code, no traceback."""
    debug = debug_enabled()
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        code = main()
    except LdtokError as e:
        if debug:
            raise
        print(f"{e.label}: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except OSError as e:
        full = disk_full_error(e, getattr(e, "filename", None) or "the output")
        if full is None or debug:
            raise
        print(f"error: {full}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(int(code or 0))
