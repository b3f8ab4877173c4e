"""Keep stdout for the one JSON object `--json` promises.

Solver libraries (HiGHS, OR-Tools) may print banners or logs on file descriptor 1 from C, and
Python code may print too; either would break `cem plan --json | jq`. While a `--json` command
computes, both go to stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def prints_to_stderr() -> Iterator[None]:
    """Send what is printed on stdout, from C (file descriptor 1) or Python, to stderr meanwhile."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (embedded): only Python's prints can be moved
        saved = None
    try:
        if saved is not None:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
