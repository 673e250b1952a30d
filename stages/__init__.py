"""One thin module per DVC stage: read its params section, call the library."""
from __future__ import annotations

import os
import sys
from typing import Callable

from pipeline.errors import FerError

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage; a user-facing error is one line and a non-zero exit, not a traceback."""
    try:
        main()
    except FerError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
