"""Distributed training on Ray Train. `TrainConfig` (config.py) is a run's frozen config;
worker.py is the per-worker loop and its blocks; launch.py builds the one TorchTrainer (`fit`)
for a stage, a Tune trial (tune.py, sweep_*.py, pg_release.py) and an ablation row; imagenet.py
is imagenet_init's streamed loop on the same blocks; imbalance.py the rare-class options;
progress.py the driver's in-epoch bar.

`run_training` is imported lazily so that `import pipeline.train` does not pull in Ray or torch.
"""
from pipeline.train.config import TrainConfig

__all__ = ["TrainConfig", "run_training"]


def __getattr__(name):
    if name == "run_training":
        from pipeline.train.launch import run_training

        return run_training
    raise AttributeError(name)
