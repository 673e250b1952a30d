"""LIP-VGG16 facial expression pipeline.

Environment defaults for every entry point (`fer`, the DVC stages, tests), set once here and
overridable by the user: Ray runs without an auth token file, MLflow sends no telemetry, and an
unreachable MLflow tracking server fails within about 18 s (two attempts of 8 s) instead of
MLflow's own minutes of retries (raise MLFLOW_HTTP_REQUEST_TIMEOUT for a slow server or large
uploads).
"""
import os as _os

for _k, _v in {"RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "8", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}.items():
    _os.environ.setdefault(_k, _v)
