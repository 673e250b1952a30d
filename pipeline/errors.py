"""One exception type for every user-facing failure, so the CLI can print one line, never a traceback."""
from __future__ import annotations

import os


class FerError(Exception):
    """Bad input or configuration: the message says what is wrong and what to do."""


def as_user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user can act on, None for a bug (keep its traceback).

    Besides FerError: MLflow and HTTP failures (an unreachable or misconfigured tracking server),
    named with the tracking URI they were talking to."""
    if isinstance(e, FerError):
        return str(e)
    if type(e).__module__.split(".")[0] in ("mlflow", "requests", "urllib3", "sqlalchemy"):
        lines = str(e).strip().splitlines()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "the local sqlite:///mlflow.db"
        return f"MLflow at {uri}: {lines[0] if lines else type(e).__name__}"
    return None
