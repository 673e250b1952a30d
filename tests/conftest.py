"""Session-wide test environment: no MLflow telemetry, no Ray auth token, set before either
library is first used; MLflow stores are per-test temp dirs, never the repo root."""
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
