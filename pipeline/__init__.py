"""LIP-VGG16 facial expression pipeline.

Environment defaults for every entry point (`fer`, the DVC stages, tests), set once here and
overridable by the user: Ray runs without an auth token file, MLflow sends no telemetry, and an
unreachable MLflow tracking server fails within about 18 s (two attempts of 8 s) instead of
MLflow's own minutes of retries (raise MLFLOW_HTTP_REQUEST_TIMEOUT for a slow server or large
uploads).

CPU kernels: pinned to AVX2 here, before torch loads (:mod:`pipeline.kernels`; ``FER_CPU_KERNELS=native``
turns the pin off), so that a run writes the same bytes on CPUs with and without AVX-512 (measured
between two AMD EPYCs; Intel untested).

Console output: ``FER_LOG_LEVEL`` (default ``warning``; ``info`` or ``debug`` for everything)
is the level of MLflow's and Ray Train's own messages on the console. The pipeline's own lines
(one per stage, per epoch, progress bars) always show; Ray's full logs stay in its session folder,
which the first Ray line names.
"""
import os as _os

LOG_LEVEL = _os.environ.get("FER_LOG_LEVEL", "warning").strip().upper() or "WARNING"
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR"):
    LOG_LEVEL = "WARNING"

for _k, _v in {"RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "8", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_LOGGING_LEVEL": LOG_LEVEL,
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": str(LOG_LEVEL == "DEBUG").lower()}.items():
    _os.environ.setdefault(_k, _v)

from pipeline.kernels import pin_cpu_kernels as _pin  # noqa: E402 - before anything imports torch

_pin()


from pipeline.ray_workarounds import quiet_report_logger as _quiet  # noqa: E402

_quiet(LOG_LEVEL)
