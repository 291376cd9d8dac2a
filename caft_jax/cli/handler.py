"""The one error handler of every command: a user's mistake is one line and an exit code, a bug is a traceback.

Problems in the user's input, config or environment raise `CaftError` (their messages name the thing and the fix),
or are operating-system errors about a path (missing, not permitted, disk full). Those print ``error: ...`` and
exit 2. SIGINT/SIGTERM end a command with one line and exit 130/143 (training saves first: `caft_jax.fit`).
Anything else is a bug in caft_jax and keeps its traceback.
"""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Callable

from caft_jax.errors import CaftError

USER_ERROR_EXIT = 2
_OS_HINTS = {
    errno.ENOSPC: "free disk space or choose another output directory",
    errno.EACCES: "fix the permissions or choose another path",
    errno.EROFS: "choose a writable output directory",
    errno.ENOENT: "check the path",
}


class _Terminated(BaseException):
    """SIGTERM outside a training loop: unwinds like Ctrl-C, so files being written are closed."""


def _raise_terminated(signum, frame):
    raise _Terminated


def guarded(command: Callable[[], int], *, rerun_hint: str = "rerun the command to continue") -> int:
    """Run ``command()`` and turn user-facing failures into one line on stderr and an exit code."""
    from caft_jax.fit import SIGNAL_EXIT, TrainingInterrupted

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return command()
    except TrainingInterrupted as stop:
        print(f"\n{stop}", file=sys.stderr)
        return stop.exit_code
    except CaftError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    except OSError as err:
        if err.errno not in _OS_HINTS:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror}{where}; {_OS_HINTS[err.errno]}.", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished results are saved, {rerun_hint}.", file=sys.stderr)
        return SIGNAL_EXIT[signal.SIGINT]
    except _Terminated:
        print(f"\nterminated; finished results are saved, {rerun_hint}.", file=sys.stderr)
        return SIGNAL_EXIT[signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
