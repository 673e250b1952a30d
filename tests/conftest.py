"""Session-wide test environment: importing the package first sets its environment defaults (no
MLflow telemetry, no Ray auth token, MLflow network timeouts) before either library is used;
MLflow stores are per-test temp dirs, never the repo root."""
import pipeline  # noqa: F401
