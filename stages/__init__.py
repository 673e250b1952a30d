"""One thin module per DVC stage: paths come from dvc.yaml as arguments (written once, there),
params from the stage's section of params.yaml; then one library call."""
from __future__ import annotations

import os
import sys
from typing import Callable

from pipeline.errors import FerError, as_user_error


def stage_args(*names: str, datasets=None) -> list[str]:
    """The stage's arguments as dvc.yaml passes them, one per name; with ``datasets``, the first
    is a dataset name that must be one of them."""
    args = sys.argv[1:]
    if len(args) != len(names):
        raise FerError(f"expected {len(names)} argument(s) ({' '.join(names)}) as dvc.yaml passes "
                       f"them; got {len(args)}: {args}")
    if datasets is not None and args[0] not in datasets:
        raise FerError(f"expected a dataset name, one of {sorted(datasets)}; got {args[0]!r}")
    return args


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
