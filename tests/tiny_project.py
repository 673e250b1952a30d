"""The tiny project that the Ray-backed sweep and ablation tests train in: the smallest network
and Ray sizing (shared), synthetic faces ingested to parquet, MLflow in a sqlite file, no cluster."""
from __future__ import annotations

import textwrap
from pathlib import Path

#: model, init and Ray sizing shared by every tiny project; each test adds its datasets, training
#: sections and (for sweeps) a tune section.
NETWORK_AND_RAY = textwrap.dedent("""\
    model:
      pool: lip                # lip | max
      head: conv
      attention: eca
      width: 0.0625
      lip_bottleneck: 0.25     # LIP logit bottleneck
      dropout: 0.3
    imagenet_init:
      source: none
    ray:
      num_workers: 1
      use_gpu: false
      cpus_per_worker: 0.5
      storage_path: ray_results
      max_failures: 0
    """)


def make_project(root: Path, monkeypatch, params_text: str,
                 datasets: dict[str, tuple[int, int]]) -> Path:
    """``root`` becomes the working folder: ``raw/<layout>`` with ``n`` synthetic faces (seed),
    ingested to ``data/parquet/<layout>``, and ``params.yaml`` = ``params_text``."""
    from pipeline.data.ingest import ingest
    from pipeline.data.synthetic import write_synthetic

    monkeypatch.chdir(root)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for layout, (n, seed) in datasets.items():
        write_synthetic(root / "raw" / layout, layout=layout, n=n, seed=seed)
        ingest(root / "raw" / layout, root / "data" / "parquet" / layout,
               report_path=root / "reports" / f"ingest_{layout}.json", progress=False)
    (root / "params.yaml").write_text(params_text)
    return root
