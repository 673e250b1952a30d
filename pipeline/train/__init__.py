"""Distributed training on Ray Train: `TrainConfig` (config.py), the per-worker loop (worker.py),
the TorchTrainer launcher (launch.py) and Ray Tune sweeps (tune.py).

`run_training` is imported lazily so that `import pipeline.train` does not pull in Ray or torch.
"""
from pipeline.train.config import TrainConfig

__all__ = ["TrainConfig", "run_training"]


def __getattr__(name):
    if name == "run_training":
        from pipeline.train.launch import run_training

        return run_training
    raise AttributeError(name)
