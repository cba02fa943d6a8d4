"""End `python -m flows.lifecycle` as soon as its work is written, without the interpreter's
teardown: freeing torch's, pandas', MLflow's and Prefect's modules object by object takes
~1.3 s on 2 cores after the last line is printed (measured; benchmarks/orchestration.py).

Python runs exit handlers last-registered-first, after joining non-daemon threads. `arm()`
registers `_exit` before anything else, so it runs after every other handler: Prefect's log
and event workers have flushed and its temporary API server is stopped, MLflow has closed its
runs. Only then does the process leave with the code it was going to exit with.
"""

from __future__ import annotations

import atexit
import os
import sys

_code = [0]


def _exit() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code[0])


def arm() -> None:
    atexit.register(_exit)


def run(main) -> None:
    """Call `main`, noting how the process is to exit (sys.exit's code; 1 for an exception,
    whose traceback Python prints as usual; 130 for Ctrl-C)."""
    try:
        main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            _code[0] = exc.code or 0
        else:  # sys.exit("message"): Python prints the message and exits 1
            _code[0] = 1
        raise
    except KeyboardInterrupt:
        _code[0] = 130  # as a shell reports Ctrl-C
        raise
    except BaseException:
        _code[0] = 1
        raise
