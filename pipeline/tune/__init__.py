"""Ray Tune sweeps over the training stages (`fer tune`): sweep.py runs or resumes one (ASHA on
val_accuracy, each trial one `pipeline.train.launch.fit`); settings.py reads params.yaml's `tune:`
section and writes `--apply`; runs.py keeps its MLflow parent and trial runs; results.py the trial
table, the best trial and the noise note. Nothing here is imported by a training stage.
"""
