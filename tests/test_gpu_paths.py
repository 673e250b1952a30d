"""The GPU branches (bf16 autocast, channels_last) forced on and run on the CPU, held to the fp32
path; torch.compile; and the `gpu`-marked tests bench/gpu.py runs (skipped without CUDA).

Tolerances, all relative to the fp32 result on the same inputs and weights:
  BF16_REL = 6e-2  loss, logits, LIP/ECA outputs, as max|error| / max|fp32| (bf16 keeps 8 bits:
                   ~4e-3 per rounding, compounded over ~20 layers; measured up to 3.3e-2 here)
  GRAD_COS = 0.75  cosine of the whole flattened gradient at initialisation (measured 0.83 for
                   LIP-VGG16 and 0.85 for plain VGG16-BN: bf16 backward through 15 BatchNorms of
                   near-cancelling early-layer gradients, not LIP); the head's gradient >= 0.98
  PROB_ABS = 2e-2  ten-crop softmax probabilities
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import FerError
from pipeline.model import ECA, lip_vgg16
from pipeline.model.lip import LIPPool2d
from pipeline.model.speed import maybe_compile, resolve_amp, resolve_channels_last
from pipeline.train.config import TrainConfig
from pipeline.train.steps import train_step
from test_evaluate import CROP, IMAGE_SIZE, make_assets

BF16_REL, GRAD_COS, PROB_ABS = 6e-2, 0.75, 2e-2
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _step_pair(device: str):
    """One SGD step of the same model and batch: fp32 contiguous vs bf16 autocast + channels_last."""
    torch.manual_seed(0)
    base = lip_vgg16(width=0.125, dropout=0.0).to(device)
    x = torch.randn(8, 3, 48, 48, device=device)
    y = torch.randint(0, 7, (8,), device=device)
    out = {}
    for fast in (False, True):
        m = copy.deepcopy(base)
        if fast:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        loss, logits = train_step(m, x, y, nn.CrossEntropyLoss(), opt, amp=fast, channels_last=fast)
        out[fast] = (loss, logits, _grad(m), m.classifier[-1].weight.grad.flatten())
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tiny_assets")


# ------------------------------------------------------------------ forced on, on the CPU
def test_auto_resolution():
    assert resolve_amp("auto", "cuda") and resolve_channels_last("auto", "cuda")
    assert not resolve_channels_last("auto", "cpu")
    assert resolve_amp(True, "cpu") and not resolve_amp(False, "cuda")
    with pytest.raises(FerError, match="amp"):
        TrainConfig(data="d", amp="yes")
    with pytest.raises(FerError, match="compile"):
        TrainConfig(data="d", compile="auto")


def test_train_step_bf16_channels_last_agrees_with_fp32():
    out = _step_pair("cpu")
    (l32, z32, g32, h32), (l16, z16, g16, h16) = out[False], out[True]
    assert abs(float(l16) - float(l32)) <= BF16_REL * float(l32)
    assert _rel(z16, z32) <= BF16_REL
    assert float(F.cosine_similarity(g16, g32, dim=0)) >= GRAD_COS
    assert float(F.cosine_similarity(h16, h32, dim=0)) >= 0.98


def test_lip_eca_and_loss_accurate_under_bf16():
    torch.manual_seed(0)
    pool, eca = LIPPool2d(16), ECA(64)
    with torch.no_grad():
        pool.logit.body[6].weight.normal_()  # logits spread over SoftGate's range
        pool.logit.body[7].weight.fill_(1.0)  # the last norm starts at zero gain
    x, f = torch.randn(4, 16, 24, 24), torch.randn(4, 64, 6, 6)
    logits, y = torch.randn(16, 7) * 3, torch.randint(0, 7, (16,))
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    ref = (pool(x), eca(f), crit(logits, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (pool(x), eca(f), crit(logits.bfloat16().float(), y))
    for name, g, r in zip(("lip", "eca", "loss"), got, ref):
        assert torch.isfinite(g).all(), name
        assert _rel(g, r) <= BF16_REL, name


def test_ten_crop_evaluation_bf16_channels_last_agrees(assets):
    from pipeline import evaluate as E
    from pipeline.data.loader import load_split
    from pipeline.model.checkpoint import load_model

    model, _ = load_model(assets["checkpoint"])
    x, y = load_split(assets["parquet"], "test", size=IMAGE_SIZE)
    p32, c32 = E.ten_crop_probabilities(model, x, CROP, amp=False, channels_last=False)
    p16, c16 = E.ten_crop_probabilities(copy.deepcopy(model).to(memory_format=torch.channels_last), x,
                                        CROP, amp=True, channels_last=True)
    assert float((p16 - p32).abs().max()) <= PROB_ABS and float((c16 - c32).abs().max()) <= PROB_ABS
    counts = E.evaluate_arrays(copy.deepcopy(model), x, y, crop=CROP, amp=True, channels_last=True)
    ref = E.evaluate_arrays(copy.deepcopy(model), x, y, crop=CROP, amp=False, channels_last=False)
    assert counts.n == ref.n == len(y)
    # a prediction may flip only where two classes were within PROB_ABS of each other
    assert abs(int(counts.ten_crop.diag().sum()) - int(ref.ten_crop.diag().sum())) <= max(1, len(y) // 20)


def test_predictor_bf16_channels_last_agrees(assets):
    import numpy as np

    from pipeline.data.loader import load_split
    from pipeline.infer.predictor import Predictor

    x, _ = load_split(assets["parquet"], "test", size=IMAGE_SIZE)
    faces = [np.ascontiguousarray(a.permute(1, 2, 0).numpy()) for a in x[:6]]
    fast = Predictor(assets["checkpoint"], device="cpu", amp=True, channels_last=True)
    ref = Predictor(assets["checkpoint"], device="cpu", amp=False, channels_last=False)
    assert float((fast.probabilities(faces) - ref.probabilities(faces)).abs().max()) <= PROB_ABS


@pytest.mark.slow
def test_ray_train_epoch_two_workers_bf16_channels_last(assets, tmp_path):
    """One epoch, 2 gloo workers, amp + channels_last forced on vs off: same losses within BF16_REL."""
    import ray

    from pipeline.train.launch import run_training

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        hist = {}
        for fast in (False, True):
            out = tmp_path / f"out{int(fast)}"
            run_training(TrainConfig(
                data=str(assets["parquet"]), image_size=IMAGE_SIZE, crop=CROP, width=0.0625, dropout=0.0,
                epochs=1, batch_size=16, optimizer="sgd", lr=0.01, warmup_epochs=0, max_rotate_deg=0.0,
                num_workers=2, use_gpu=False, max_failures=0, storage_path=str(tmp_path / "ray"),
                output=str(out), amp=fast, channels_last=fast))
            hist[fast] = json.loads((out / "history.json").read_text())[-1]
    finally:
        if started:
            ray.shutdown()
    assert abs(hist[True]["train_loss"] - hist[False]["train_loss"]) <= BF16_REL * hist[False]["train_loss"]


# ------------------------------------------------------------------ torch.compile
@pytest.mark.slow  # inductor compiles forward and backward C++ kernels: ~1 min on 2 cores
def test_compiled_lip_block_matches_eager_and_trains():
    """A LIP block compiled (inductor, C++ on CPU) equals eager within fp32 rounding and trains."""
    torch.manual_seed(0)
    blk = LIPPool2d(8)
    with torch.no_grad():
        blk.logit.body[6].weight.normal_()
        blk.logit.body[7].weight.fill_(1.0)  # the last norm starts at zero gain
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    ref = blk(x)
    ref.square().sum().backward()
    g_ref, w_ref = x.grad.clone(), blk.logit.body[0].weight.grad.clone()
    x.grad = None
    blk.zero_grad()
    fast = maybe_compile(blk, True)
    out = fast(x)
    out.square().sum().backward()
    assert _rel(out, ref) <= 1e-4
    assert _rel(x.grad, g_ref) <= 1e-4 and _rel(blk.logit.body[0].weight.grad, w_ref) <= 1e-4
    opt = torch.optim.SGD(blk.parameters(), lr=0.1)
    before = fast(x).square().sum().item()
    for _ in range(3):
        opt.zero_grad()
        fast(x).square().sum().backward()
        opt.step()
    assert fast(x).square().sum().item() < before


def test_compile_without_a_cpp_compiler_is_one_line_error(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("with CUDA, inductor needs no host compiler for the model's kernels")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FerError, match="C\\+\\+ compiler"):
        maybe_compile(nn.Linear(2, 2), True)
    assert isinstance(maybe_compile(nn.Linear(2, 2), False), nn.Linear)


# ------------------------------------------------------------------ on a GPU (bench/gpu.py)
@pytest.mark.gpu
@cuda
def test_gpu_bf16_channels_last_training_step_agrees_with_cpu_fp32():
    cpu, gpu = _step_pair("cpu")[False], _step_pair("cuda")[True]
    assert abs(float(gpu[0]) - float(cpu[0])) <= BF16_REL * float(cpu[0])
    assert float(F.cosine_similarity(gpu[2].cpu(), cpu[2], dim=0)) >= GRAD_COS
    assert float(F.cosine_similarity(gpu[3].cpu(), cpu[3], dim=0)) >= 0.98


def _nccl_worker(rank: int, world: int, init: str, q) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    t = torch.full((4,), float(rank + 1), device="cuda")
    dist.all_reduce(t)
    q.put((rank, t.cpu().tolist()))
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_nccl_two_process_all_reduce(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_nccl_worker, args=(2, init, q), nprocs=2, join=True)
    got = sorted(q.get(timeout=60) for _ in range(2))
    assert got == [(0, [3.0] * 4), (1, [3.0] * 4)]


@pytest.mark.gpu
@cuda
def test_gpu_device_loader_builds_batches_on_the_gpu():
    from pipeline.data.loader import DeviceBatches

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 56, 56), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 7, (40,), generator=g)
    train = DeviceBatches(images, labels, batch_size=16, crop=48, train=True, device="cuda",
                          max_rotate_deg=10.0, drop_last=True)
    for x, y in train:
        assert x.device.type == "cuda" and x.shape == (16, 3, 48, 48) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and y.device.type == "cuda"
    cpu = list(DeviceBatches(images, labels, batch_size=16, crop=48, train=False, device="cpu"))
    gpu = list(DeviceBatches(images, labels, batch_size=16, crop=48, train=False, device="cuda"))
    for (xc, yc), (xg, yg) in zip(cpu, gpu):  # evaluation crops: the same pixels
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


@pytest.mark.gpu
@cuda
def test_gpu_ten_crop_evaluation_equals_cpu(assets):
    from pipeline import evaluate as E
    from pipeline.data.loader import load_split
    from pipeline.model.checkpoint import load_model

    model, _ = load_model(assets["checkpoint"])
    x, _ = load_split(assets["parquet"], "test", size=IMAGE_SIZE)
    p_cpu, _ = E.ten_crop_probabilities(model, x, CROP, "cpu", amp=False, channels_last=False)
    p_gpu, _ = E.ten_crop_probabilities(copy.deepcopy(model).cuda(), x, CROP, "cuda")  # auto: bf16 + CL
    assert float((p_gpu.cpu() - p_cpu).abs().max()) <= PROB_ABS


def test_gpu_marker_is_registered(pytestconfig):
    assert any(m.startswith("gpu:") for m in pytestconfig.getini("markers"))


def test_cpu_bf16_detection_can_be_forced(monkeypatch):
    from pipeline.model.speed import cpu_has_native_bf16

    monkeypatch.setenv("FER_CPU_BF16", "1")
    assert cpu_has_native_bf16()
    assert not resolve_amp("auto", "cpu")  # auto is fp32 on every CPU, native bf16 or not
    monkeypatch.setenv("FER_CPU_BF16", "0")
    assert not cpu_has_native_bf16() and not resolve_amp("auto", "cpu")
    assert resolve_amp("auto", "cuda") and resolve_amp(True, "cpu")
