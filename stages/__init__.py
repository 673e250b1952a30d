"""One thin module per DVC stage: read its params section, call the library."""
from __future__ import annotations

import os
import sys
from typing import Callable

from pipeline.errors import FerError, as_user_error

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def dataset_argument(known) -> str:
    """The stage's one argument (the dataset name), checked against ``known``."""
    known = sorted(known)
    if len(sys.argv) != 2 or sys.argv[1] not in known:
        got = repr(sys.argv[1]) if len(sys.argv) > 1 else "nothing"
        raise FerError(f"expected one dataset name, one of {known}; got {got}")
    return sys.argv[1]


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage; a user-facing error is one line and a non-zero exit, not a traceback."""
    try:
        main()
    except Exception as e:  # noqa: BLE001 - user errors are one line, bugs keep their traceback
        msg = as_user_error(e)
        if msg is None:
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
        sys.exit(2)
