import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.errors import FerError
from pipeline.model import ECA, LIPLogit, eca_kernel_size, lip2d, lip_vgg16
from pipeline.model.lip import LIPPool2d
from pipeline.model.pretrained import load_vgg16_bn_file, map_vgg16_bn

VARIANTS = list(itertools.product(("lip", "max"), ("conv", "fc"), ("eca", "none")))


def lip_reference(x, logits, k=2, s=2):
    """The LIP paper's formula, in float64, with no shift."""
    x, logits = x.double(), logits.double()
    w = logits.exp()
    return F.avg_pool2d(x * w, k, s) / F.avg_pool2d(w, k, s)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 9, 7), (3, 2, 5, 5)])
def test_lip2d_matches_float64_reference(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    logits = torch.rand(shape, generator=g) * 12  # SoftGate's whole range
    out = lip2d(x, logits)
    ref = lip_reference(x, logits)
    assert out.shape == ref.shape
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_lip2d_overlapping_window_matches_reference():
    g = torch.Generator().manual_seed(1)
    x, logits = torch.randn(2, 3, 9, 9, generator=g), torch.rand(2, 3, 9, 9, generator=g) * 12
    assert torch.allclose(lip2d(x, logits, 3, 2).double(), lip_reference(x, logits, 3, 2), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lip2d_finite_in_half_precision_at_max_logit(dtype):
    x = torch.randn(2, 8, 16, 16).to(dtype) * 100
    logits = torch.full_like(x, 12.0)
    logits[..., ::2, ::2] = 0.0  # windows mixing e^0 and e^12
    out = lip2d(x, logits)
    assert torch.isfinite(out).all()
    ref = lip_reference(x.float(), logits.float())
    assert torch.allclose(out.double(), ref, rtol=2e-2, atol=2e-2 * 100)
    # the naive formula overflows here: the shift is what keeps us finite
    naive = F.avg_pool2d(x * logits.exp(), 2) / F.avg_pool2d(logits.exp(), 2)
    if dtype == torch.float16:
        assert not torch.isfinite(naive).all()


def test_constant_logits_give_average_pooling():
    x = torch.randn(2, 5, 10, 10)
    for c in (0.0, 3.7, 12.0):
        assert torch.allclose(lip2d(x, torch.full_like(x, c)), F.avg_pool2d(x, 2), atol=1e-6)


def test_lip2d_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    lg = (torch.rand(1, 2, 4, 6, dtype=torch.float64, generator=g) * 12).requires_grad_()
    assert torch.autograd.gradcheck(lip2d, (x, lg))
    assert torch.autograd.gradcheck(lambda a, b: lip2d(a, b, 3, 2), (x, lg))


def test_lip2d_channels_last_equals_contiguous():
    x, lg = torch.randn(2, 4, 8, 8), torch.rand(2, 4, 8, 8) * 12
    cl = lip2d(x.to(memory_format=torch.channels_last), lg.to(memory_format=torch.channels_last))
    assert torch.allclose(cl, lip2d(x, lg), atol=1e-6)


def test_logit_module_starts_as_average_pooling():
    torch.manual_seed(0)
    m = LIPLogit(16)
    x = torch.randn(2, 16, 8, 8)
    logits = m(x)
    assert torch.allclose(logits, torch.full_like(logits, 6.0))  # 12 * sigmoid(0)
    assert logits.min() >= 0 and logits.max() <= 12


@pytest.mark.parametrize("c,k", [(16, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (4096, 7)])
def test_eca_kernel_size(c, k):
    assert eca_kernel_size(c) == k


def test_eca_is_channel_gate():
    m = ECA(32)
    x = torch.randn(2, 32, 5, 5)
    y = m(x)
    gate = y / x
    # one gate per (sample, channel), strictly between 0 and 1
    assert torch.allclose(gate, gate[..., :1, :1].expand_as(gate), atol=1e-5)
    assert (gate > 0).all() and (gate < 1).all()


@pytest.mark.parametrize("pool,head,attention", VARIANTS)
def test_output_shapes_all_variants_all_sizes(pool, head, attention):
    torch.manual_seed(0)
    m = lip_vgg16(7, pool=pool, head=head, attention=attention, width=0.125).eval()
    with torch.no_grad():
        for size in (48, 90, 100, 112, 224):
            out = m(torch.randn(2, 3, size, size))
            assert out.shape == (2, 7), (size, out.shape)
            assert torch.isfinite(out).all()


def test_bad_arguments_and_sizes():
    with pytest.raises(ValueError, match="pool"):
        lip_vgg16(pool="median")
    m = lip_vgg16(width=0.125).eval()
    with pytest.raises(ValueError, match="48..224"):
        m(torch.zeros(1, 3, 40, 40))


def test_conv_head_cuts_parameters():
    fc = sum(p.numel() for p in lip_vgg16(head="fc", pool="max", attention="none").parameters())
    conv = sum(p.numel() for p in lip_vgg16(head="conv", pool="max", attention="none").parameters())
    assert conv < fc / 5


def _tv_state_dict(num_classes=1000):
    torch.manual_seed(0)
    return torchvision.models.vgg16_bn(weights=None, num_classes=num_classes).state_dict()


def test_plain_variant_is_torchvision_vgg16_bn():
    tv = torchvision.models.vgg16_bn(weights=None).eval()
    ours = lip_vgg16(1000, pool="max", head="fc", attention="none").eval()
    assert list(ours.state_dict()) == list(tv.state_dict())
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 100, 100)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))


@pytest.mark.parametrize("pool,head,attention", VARIANTS)
def test_weight_mapping_copies_exactly(tmp_path, pool, head, attention):
    sd = _tv_state_dict()
    path = tmp_path / "vgg16_bn.pth"
    torch.save(sd, path)
    m = lip_vgg16(7, pool=pool, head=head, attention=attention)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    report = load_vgg16_bn_file(m, path)
    after = m.state_dict()
    assert all(k.startswith(("features.", "classifier.")) for k in report.copied)
    n_convbn = sum(1 for k in sd if k.startswith("features."))
    assert sum(k.startswith("features.") for k in report.copied) == n_convbn
    for k in report.copied:
        assert torch.equal(after[k], sd[k]), k
    for k in report.new:  # new parts untouched
        assert torch.equal(after[k], before[k]), k
    assert "classifier.6.weight" not in report.copied
    if head == "fc":
        assert "classifier.0.weight" in report.copied
    if pool == "lip":
        assert any(".logit." in k for k in report.new)


def test_weight_mapping_refuses_wrong_shapes(tmp_path):
    small = torchvision.models.vgg11_bn(weights=None).state_dict()
    torch.save(small, tmp_path / "vgg11.pth")
    with pytest.raises(FerError, match="vgg16_bn|do not fit"):
        load_vgg16_bn_file(lip_vgg16(), tmp_path / "vgg11.pth")
    sd = _tv_state_dict()
    with pytest.raises(FerError, match="width must be 1.0"):
        map_vgg16_bn(lip_vgg16(width=0.5), sd)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FerError, match="cannot read"):
        load_vgg16_bn_file(lip_vgg16(), tmp_path / "junk.pth")
    with pytest.raises(FerError, match="does not exist"):
        load_vgg16_bn_file(lip_vgg16(), tmp_path / "missing.pth")


# The bound both LIP forms are held to over SoftGate's whole range [0, 12], windows mixing e^0 and
# e^12: |out - float64 reference| <= TOL * max|x|, TOL = 1e-6 in fp32 (~8 ulp; both measure
# ~1.5e-7) and 1e-2 in bf16 (~2.5 ulp of bf16's 2^-8; both measure ~5e-3).
LIP_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", list(LIP_TOL))
@pytest.mark.parametrize("k,s", [(2, 2), (3, 2)])
def test_lip2d_bounded_form_as_exact_as_the_shifted_form(dtype, k, s):
    from pipeline.model.lip import lip2d_bounded

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 17, 16, generator=g) * 10).to(dtype)
    logits = torch.rand(4, 8, 17, 16, generator=g) * 12
    logits[..., ::2, ::2] = 0.0
    logits = logits.to(dtype)
    ref = lip_reference(x, logits, k, s)
    bound = LIP_TOL[dtype] * float(x.abs().max())
    for f in (lip2d, lip2d_bounded):
        out = f(x, logits, k, s)
        assert torch.isfinite(out).all()
        assert float((out.double() - ref).abs().max()) <= bound, f.__name__


def test_lip2d_bounded_gradcheck_float64():
    from pipeline.model.lip import lip2d_bounded

    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    lg = (torch.rand(1, 2, 4, 6, dtype=torch.float64, generator=g) * 12).requires_grad_()
    assert torch.autograd.gradcheck(lip2d_bounded, (x, lg))


@pytest.mark.parametrize("k,shape", [(2, (2, 3, 7, 9)), (3, (1, 2, 8, 7))])
def test_lip2d_bounded_hand_written_gradient_is_autograds(k, shape):
    """The training path's hand-written backward (odd sizes: rows no window covers get 0) against
    autograd through the plain formula, and against finite differences."""
    from pipeline.model.lip import BoundedLIPFunction

    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    lg = (torch.rand(*shape, dtype=torch.float64, generator=g) * 12).requires_grad_()
    up = torch.randn(shape[0], shape[1], shape[2] // k, shape[3] // k, dtype=torch.float64, generator=g)
    w = torch.exp(lg)
    plain = F.avg_pool2d(x * w, k) / F.avg_pool2d(w, k)
    want = torch.autograd.grad(plain, (x, lg), up)
    out = BoundedLIPFunction.apply(x, lg, k)
    got = torch.autograd.grad(out, (x, lg), up)
    assert torch.equal(out, plain)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: BoundedLIPFunction.apply(a, b, k), (x, lg))


def test_logit_module_norm_is_instance_norm():
    """`InstanceNorm` (GroupNorm, one channel a group) normalises as nn.InstanceNorm2d(affine) does,
    forward and backward, and loads its state dict: checkpoints from before it load unchanged."""
    from pipeline.model.lip import InstanceNorm

    torch.manual_seed(0)
    ref = nn.InstanceNorm2d(6, affine=True)
    with torch.no_grad():
        ref.weight.normal_(), ref.bias.normal_()
    ours = InstanceNorm(6)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 6, 9, 11, requires_grad=True)
    up = torch.randn(3, 6, 9, 11)
    a, b = ref(x), ours(x)
    assert torch.allclose(a, b, atol=1e-5)
    ga = torch.autograd.grad(a, (x, ref.weight), up)
    gb = torch.autograd.grad(b, (x, ours.weight), up)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, atol=1e-4)


def test_lip_pool_keeps_the_shift_for_fp16():
    torch.manual_seed(0)
    m = lip_vgg16(width=0.125).features[6]  # the first LIPPool2d
    with torch.no_grad():
        m.logit.body[6].weight.normal_()
        m.logit.body[7].weight.fill_(1.0)  # the last norm starts at zero gain
        x = torch.randn(2, 8, 16, 16) * 100
        half = m.half()(x.half())  # logits up to 12 in fp16: the naive form would overflow
    assert torch.isfinite(half).all()


def test_avg_pool_variant_is_average_pooling():
    m = lip_vgg16(width=0.125, pool="avg")
    pools = [f for f in m.features if isinstance(f, nn.AvgPool2d)]
    assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)


def test_lip_departs_from_average_pooling_smoothly():
    """LIP starts as average pooling (every logit SoftGate(0) = 6) and its logits spread in
    proportion to the optimiser's steps, never jumping to the norm's unit variance in one step
    (the old start, a zero last conv before an InstanceNorm, went from constant to
    12 * sigmoid(N(0, 1)) after the first step)."""
    torch.manual_seed(0)
    pool = LIPPool2d(16)
    x = torch.randn(8, 16, 12, 12)
    logits0 = pool.logit(x)
    assert torch.allclose(logits0, torch.full_like(logits0, 6.0))
    avg = F.avg_pool2d(x, 2, 2)
    assert torch.allclose(pool(x), avg, atol=1e-6)
    opt = torch.optim.AdamW(pool.parameters(), lr=1e-3)
    target = torch.randn_like(avg)
    spreads = []
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(pool(x), target).backward()
        opt.step()
        with torch.no_grad():
            lg = pool.logit(x)
            spreads.append(float((lg - lg.mean(dim=(2, 3), keepdim=True)).abs().amax()))
    # AdamW moves each gain by about lr per step, so the logits' spread after k steps is of the
    # order of 12/4 * k * lr * (normalised activations of a few units): far below one unit.
    assert 0 < spreads[0] < 0.1, spreads
    assert all(b >= a * 0.5 for a, b in zip(spreads, spreads[1:])), spreads
    assert spreads[-1] < 0.5, spreads


def test_max_start_is_a_soft_max_pooling_between_average_and_max():
    """`lip_start: max` starts LIP at G = SoftGate(gain * I): on post-ReLU features each window's
    output lies between its mean and its max, nearer the max, and the gain learns."""
    torch.manual_seed(0)
    pool = LIPPool2d(16, start="max")
    x = torch.relu(torch.randn(4, 16, 12, 12))
    out = pool(x)
    avg, mx = F.avg_pool2d(x, 2), F.max_pool2d(x, 2)
    assert torch.all(out >= avg - 1e-6) and torch.all(out <= mx + 1e-6)
    spread = mx - avg
    assert float(((out - avg) / spread.clamp_min(1e-6))[spread > 0.5].mean()) > 0.6
    # the same windows under the paper's start are exactly their means
    assert torch.allclose(LIPPool2d(16)(x), avg, atol=1e-6)
    out.sum().backward()
    assert pool.logit.input_gain.grad.abs().sum() > 0


def test_lip_start_is_recorded_and_checkpoints_round_trip(tmp_path):
    from pipeline.model import checkpoint

    m = lip_vgg16(7, width=0.125, lip_start="max")
    assert m.config["lip_start"] == "max"
    assert "lip_start" not in lip_vgg16(7, width=0.125).config  # the paper's module: config unchanged
    assert "lip_start" not in lip_vgg16(7, pool="max", width=0.125, lip_start="max").config
    assert not any("input_gain" in k for k in lip_vgg16(7, width=0.125).state_dict())
    with torch.no_grad():
        m.features[6].logit.input_gain.fill_(2.5)
    path = checkpoint.save_model(tmp_path / "m.pt", m.state_dict(), model_config=m.config,
                                 classes=[str(i) for i in range(7)], image_size=56, crop=48)
    back, _ = checkpoint.load_model(path)
    assert back.config == m.config
    assert float(back.features[6].logit.input_gain.mean()) == 2.5
    with pytest.raises(ValueError, match="lip_start"):
        lip_vgg16(7, width=0.125, lip_start="min")
