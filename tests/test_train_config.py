"""TrainConfig validation and init-checkpoint loading (no Ray)."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import FerError
from pipeline.model import lip_vgg16
from pipeline.train.config import TrainConfig
from pipeline.cluster import auto_cpus_per_worker
from pipeline.model.checkpoint import load_init as load_init_checkpoint
from pipeline.train.steps import lr_lambda


def test_from_dict_accepts_known_keys_and_defaults():
    cfg = TrainConfig.from_dict({"data": "d", "epochs": 3, "image_size": 56, "crop": 48,
                                 "use_gpu": False, "amp": "auto", "cpus_per_worker": 0.5})
    assert cfg.epochs == 3 and cfg.crop == 48 and cfg.num_classes == 7
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.network() == dict(num_classes=7, pool="lip", head="conv", attention="eca",
                                      width=1.0, lip_bottleneck=0.25, dropout=0.5)
    assert set(cfg.network()) <= set(lip_vgg16(width=0.125).config)
    # lip_start reaches the network only where it changes the module (LIP pools, the max start)
    assert cfg.model_copy(update={"lip_start": "max"}).network()["lip_start"] == "max"
    assert "lip_start" not in cfg.model_copy(update={"lip_start": "max", "pool": "max"}).network()


def test_from_dict_rejects_unknown_keys_naming_them():
    with pytest.raises(FerError, match="epoch_count.*lr_max|lr_max.*epoch_count"):
        TrainConfig.from_dict({"data": "d", "epoch_count": 3, "lr_max": 1.0})
    with pytest.raises(FerError, match="data"):
        TrainConfig.from_dict({"epochs": 3})
    with pytest.raises(FerError, match="mapping"):
        TrainConfig.from_dict(["data"])


@pytest.mark.parametrize("key,value", [
    ("crop", 40), ("crop", 300), ("image_size", 47), ("epochs", 0), ("epochs", 2.5), ("lr", 0),
    ("lr", -1.0), ("batch_size", 1), ("optimizer", "adam"), ("schedule", "linear"), ("pool", "median"),
    ("head", "mlp"), ("attention", "se"), ("width", 0), ("dropout", 1.0), ("label_smoothing", -0.1),
    ("momentum", 1.0), ("patience", -1), ("num_workers", 0), ("use_gpu", "yes"), ("amp", "fp16"),
    ("channels_last", 1), ("cpus_per_worker", 0), ("max_failures", -2), ("class_weighted", "no"),
    ("num_classes", 1), ("run_name", "a/b"), ("init", ""), ("gamma", 0), ("warmup_epochs", -1),
    ("max_rotate_deg", 200), ("epochs", True), ("lip_start", "min"), ("lip_start", True),
])
def test_bad_values_are_fer_errors(key, value):
    with pytest.raises(FerError, match=key):
        TrainConfig.from_dict({"data": "d", key: value})


def test_cross_field_checks():
    with pytest.raises(FerError, match="larger than image_size"):
        TrainConfig(data="d", image_size=56, crop=64)
    with pytest.raises(FerError, match="per worker"):
        TrainConfig(data="d", batch_size=4, num_workers=4)


def test_run_name_defaults_from_output():
    assert TrainConfig(data="d", output="models/rafdb").resolved_run_name == "train-rafdb"
    assert TrainConfig(data="d", run_name="x").resolved_run_name == "x"


def test_auto_cpus_never_take_every_cpu():
    for cpus in (1, 2, 4, 16):
        for workers in (1, 2, 4):
            cpw = auto_cpus_per_worker(cpus, workers)
            assert cpw > 0
            if cpus >= 2:
                assert workers * cpw < cpus or cpw == 0.25


def test_lr_lambda_warmup_cosine_step():
    f = lr_lambda(10, 5, 1, "cosine", 2, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(49) < 0.01
    g = lr_lambda(10, 5, 0, "step", 2, 0.1)
    assert g(0) == 1.0 and g(19) == 1.0 and g(20) == pytest.approx(0.1) and g(40) == pytest.approx(0.01)


def _save(model, path):
    torch.save({"state_dict": model.state_dict(), "model_config": model.config}, path)


def test_init_checkpoint_reinitialises_only_the_classifier_when_classes_differ(tmp_path):
    torch.manual_seed(1)
    src = lip_vgg16(num_classes=7, width=0.125)
    for p in src.parameters():  # make every tensor distinguishable from a fresh init
        p.data.add_(1.0)
    _save(src, tmp_path / "src.pt")
    torch.manual_seed(2)
    dst = lip_vgg16(num_classes=3, width=0.125)
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    rep = load_init_checkpoint(dst, tmp_path / "src.pt")
    prefix = dst.classifier_prefix
    assert sorted(rep["reinit"]) == [prefix + "bias", prefix + "weight"]
    assert not rep["missing"]
    for k, v in dst.state_dict().items():
        if k.startswith(prefix):
            assert torch.equal(v, fresh[k]), k          # kept its fresh init
        else:
            assert torch.equal(v, src.state_dict()[k]), k  # copied
    # same classes: everything is copied, classifier included
    same = lip_vgg16(num_classes=7, width=0.125)
    rep = load_init_checkpoint(same, tmp_path / "src.pt")
    assert not rep["reinit"] and not rep["missing"]
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in same.state_dict().items())


def test_init_checkpoint_from_other_architecture_is_an_error(tmp_path):
    _save(lip_vgg16(width=0.25), tmp_path / "wide.pt")
    with pytest.raises(FerError, match="does not fit"):
        load_init_checkpoint(lip_vgg16(width=0.125), tmp_path / "wide.pt")
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(FerError, match="state_dict"):
        load_init_checkpoint(lip_vgg16(width=0.125), tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(FerError, match="cannot read"):
        load_init_checkpoint(lip_vgg16(width=0.125), tmp_path / "junk.pt")


def test_init_checkpoint_missing_tensors_keep_their_init(tmp_path):
    # e.g. an ImageNet-init file for a max-pool network loaded into a LIP network
    src = lip_vgg16(width=0.125, pool="max")
    _save(src, tmp_path / "max.pt")
    dst = lip_vgg16(width=0.125, pool="lip")
    rep = load_init_checkpoint(dst, tmp_path / "max.pt")
    assert rep["missing"] and all(".logit." in k for k in rep["missing"])
    assert rep["copied"]


def test_step_reporter_sends_about_twenty_updates_and_always_the_last_step():
    from pipeline.train.progress import step_reporter

    class Q(list):
        def put_nowait(self, item):
            self.append(item)

    q = Q()
    report = step_reporter(q, 0, steps=45, epochs=3)
    for step in range(1, 46):
        report(2, step)
    assert [s for _, s, _, _ in q] == [2 * k for k in range(1, 23)] + [45]
    assert all(e == 2 and n == 45 and t == 3 for e, _, n, t in q)
    assert step_reporter(q, 1, steps=45, epochs=3) is None  # rank 0 only
    assert step_reporter(None, 0, steps=45, epochs=3) is None                     # no bar asked for


def test_progress_bar_only_on_a_terminal_unless_forced(monkeypatch):
    import sys

    from pipeline.train import progress

    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.delenv("FER_PROGRESS", raising=False)
    for tty in (True, False):
        monkeypatch.setattr(sys, "stderr", Tty(tty))
        assert progress.wanted() is tty
        monkeypatch.setenv("FER_PROGRESS", "0")
        assert progress.wanted() is False
        monkeypatch.setenv("FER_PROGRESS", "1")
        assert progress.wanted() is True
        monkeypatch.delenv("FER_PROGRESS")
    assert progress.EpochBar(enabled=False).start().queue is None  # no queue, no Ray needed
