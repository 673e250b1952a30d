"""One training run on Ray Train. `TrainConfig` (config.py) is a run's frozen config; launch.py
builds the one TorchTrainer (`fit`) for a stage, a Tune trial (pipeline.tune) and an ablation
row, and resumes or falls back past a damaged checkpoint; worker.py is the face-set loop and
imagenet.py imagenet_init's streamed loop, both built from steps.py's blocks; imbalance.py the
rare-class options; progress.py the driver's in-epoch bar.

`run_training` is imported lazily so that `import pipeline.train` does not pull in Ray or torch.
"""
from pipeline.train.config import TrainConfig

__all__ = ["TrainConfig", "run_training"]


def __getattr__(name):
    if name == "run_training":
        from pipeline.train.launch import run_training

        return run_training
    raise AttributeError(name)
