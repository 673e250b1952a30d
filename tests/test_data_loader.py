"""The device-side loader: sharded decode, crop/flip/rotate statistics, ten-crop vs torchvision."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.data.ingest import SCHEMA, ingest
from pipeline.data.loader import (IMAGENET_MEAN, IMAGENET_STD, DeviceBatches, center_crop,
                                  load_split, normalize, random_crop_flip, ten_crop)
from pipeline.data.synthetic import write_synthetic
from pipeline.errors import FerError


def _coded(B: int, H: int, W: int) -> torch.Tensor:
    """Images whose pixel (y, x) holds y*16 + x in channel 0 (so a crop reveals its offset)."""
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    img = torch.stack([yy * 16 + xx, 255 - (yy * 16 + xx), yy * 3], 0).to(torch.uint8)
    return img.expand(B, 3, H, W).contiguous()


# --------------------------------------------------------------------------- crops


@pytest.mark.parametrize("hw,crop", [((100, 100), 90), ((101, 99), 90), ((48, 48), 40), ((13, 12), (7, 6))])
def test_ten_crop_equals_torchvision(hw, crop):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, *hw), generator=g, dtype=torch.uint8)
    got = ten_crop(x, crop)
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    assert got.shape == (3, 10, 3, ch, cw)
    for b in range(3):
        ref = torch.stack(T.TenCrop(crop)(x[b]))
        assert torch.equal(got[b], ref)
        # and on the PIL image, the path the usual FER repos take
        pil = Image.fromarray(x[b].permute(1, 2, 0).numpy())
        ref_pil = torch.stack([T.functional.pil_to_tensor(c) for c in T.TenCrop(crop)(pil)])
        assert torch.equal(got[b], ref_pil)
        assert torch.equal(center_crop(x[b:b + 1], crop)[0], T.CenterCrop(crop)(x[b]))


def test_random_crop_every_offset_reachable_and_flip_about_half():
    H = W = 12
    crop = 8
    B = 4000
    x = _coded(B, H, W)
    g = torch.Generator().manual_seed(123)
    out = random_crop_flip(x, crop, generator=g)
    assert out.shape == (B, 3, crop, crop) and out.dtype == torch.uint8
    v = out[:, 0].long()
    flipped = (v[:, 0, 1] - v[:, 0, 0]) == -1
    left = torch.where(flipped, v[:, 0, -1], v[:, 0, 0])
    oy, ox = left // 16, left % 16
    counts = torch.zeros(H - crop + 1, W - crop + 1)
    for a, b in zip(oy.tolist(), ox.tolist()):
        counts[a, b] += 1
    assert (counts > 0).all()                                       # every offset 0..H-crop reachable
    assert counts.sum() == B and counts.max() < 2.5 * B / counts.numel()   # roughly uniform
    assert oy.min() == 0 and oy.max() == H - crop and ox.max() == W - crop
    assert 0.45 < flipped.float().mean().item() < 0.55
    # each output is exactly the (mirrored) window of the input, in every channel
    for i in range(0, B, 397):
        win = x[i, :, oy[i]:oy[i] + crop, ox[i]:ox[i] + crop]
        assert torch.equal(out[i], win.flip(-1) if flipped[i] else win)


def test_random_crop_flip_p_and_determinism():
    x = _coded(1000, 10, 10)
    none = random_crop_flip(x, 6, generator=torch.Generator().manual_seed(0), flip_p=0.0)
    assert ((none[:, 0, 0, 1].long() - none[:, 0, 0, 0].long()) == 1).all()
    a = random_crop_flip(x, 6, generator=torch.Generator().manual_seed(5))
    b = random_crop_flip(x, 6, generator=torch.Generator().manual_seed(5))
    c = random_crop_flip(x, 6, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rotation_path_matches_crop_at_zero_angle_and_rotates_otherwise():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (64, 3, 20, 20), generator=g, dtype=torch.uint8)
    ref = random_crop_flip(x, 16, generator=torch.Generator().manual_seed(9))
    tiny = random_crop_flip(x, 16, generator=torch.Generator().manual_seed(9), max_rotate_deg=1e-7)
    assert tiny.dtype == torch.float32 and tiny.shape == ref.shape
    assert torch.allclose(tiny, ref.float(), atol=1e-2)
    rot = random_crop_flip(x, 16, generator=torch.Generator().manual_seed(9), max_rotate_deg=15)
    assert rot.min() >= 0 and rot.max() <= 255
    diff = (rot - ref.float()).abs().mean(dim=(1, 2, 3))
    assert (diff > 1).float().mean() > 0.9                           # almost all samples rotated
    # a rotation keeps the crop centre in place
    c = 16 // 2
    assert torch.allclose(rot[:, :, c - 1:c + 1, c - 1:c + 1].mean(), ref[:, :, c - 1:c + 1, c - 1:c + 1].float().mean(), atol=8)


def test_normalize_matches_torchvision():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    ref = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(x.float() / 255)
    assert torch.allclose(normalize(x), ref, atol=1e-5)
    assert normalize(x).dtype == torch.float32
    tc = ten_crop(x, 3)
    assert torch.allclose(normalize(tc)[:, 4], normalize(center_crop(x, 3)), atol=1e-6)


def test_crop_too_big_is_an_error():
    with pytest.raises(FerError):
        ten_crop(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 9)
    with pytest.raises(FerError):
        DeviceBatches(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2), batch_size=1,
                      crop=9, train=True)


# --------------------------------------------------------------------------- DeviceBatches


def test_device_batches_train_epochs():
    N = 50
    x = torch.randint(0, 256, (N, 3, 12, 12), dtype=torch.uint8)
    y = torch.arange(N)
    db = DeviceBatches(x, y, batch_size=16, crop=10, train=True, seed=3, max_rotate_deg=5)
    assert len(db) == 4
    ep0 = list(db)
    assert [len(b[1]) for b in ep0] == [16, 16, 16, 2]
    xb, yb = ep0[0]
    assert xb.shape == (16, 3, 10, 10) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert sorted(torch.cat([b[1] for b in ep0]).tolist()) == list(range(N))  # each once
    again = list(db)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ep0, again))
    db.set_epoch(1)
    ep1 = list(db)
    assert not torch.equal(torch.cat([b[1] for b in ep0]), torch.cat([b[1] for b in ep1]))
    assert abs(xb.mean().item()) < 3                                 # normalised, not 0..255
    dl = DeviceBatches(x, y, batch_size=16, crop=10, train=True, drop_last=True)
    assert len(dl) == 3 and [len(b[1]) for b in dl] == [16, 16, 16]


def test_device_batches_eval_ten_crop_and_center():
    N = 7
    x = torch.randint(0, 256, (N, 3, 12, 12), dtype=torch.uint8)
    y = torch.arange(N)
    db = DeviceBatches(x, y, batch_size=4, crop=10, train=False)
    batches = list(db)
    assert len(db) == 2 and [b[0].shape for b in batches] == [(4, 10, 3, 10, 10), (3, 10, 3, 10, 10)]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)        # in order, no padding
    assert torch.allclose(batches[0][0], normalize(ten_crop(x[:4], 10)))
    dc = DeviceBatches(x, y, batch_size=4, crop=10, train=False, center=True)
    xb, _ = next(iter(dc))
    assert xb.shape == (4, 3, 10, 10) and torch.allclose(xb, normalize(x[:4, :, 1:11, 1:11]))


# --------------------------------------------------------------------------- load_split


@pytest.fixture(scope="module")
def small_parquet(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ld")
    write_synthetic(base / "raf", layout="rafdb", n=45, seed=8)
    ingest(base / "raf", base / "pq", report_path=base / "r.json", progress=False, workers=1)
    return base / "pq"


def test_load_split_decodes_and_shards(small_parquet):
    t = pq.read_table(small_parquet / "train.parquet")
    x, y = load_split(small_parquet, "train")
    assert x.shape == (t.num_rows, 3, 100, 100) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == t.column("label").to_pylist()
    first = np.array(Image.open(io.BytesIO(t.column("image")[0].as_py())).convert("RGB"))
    assert torch.equal(x[0], torch.from_numpy(first).permute(2, 0, 1))
    shards = [load_split(small_parquet, "train", rank=r, world_size=3) for r in range(3)]
    assert sum(len(s[0]) for s in shards) == len(x)                  # no padding, no duplicates
    for r, (xs, ys) in enumerate(shards):
        assert torch.equal(xs, x[r::3]) and torch.equal(ys, y[r::3])
    xs, _ = load_split(small_parquet, "test", size=64)
    assert xs.shape[1:] == (3, 64, 64)
    with pytest.raises(FerError):
        load_split(small_parquet, "train", rank=3, world_size=3)
    with pytest.raises(FerError):
        load_split(small_parquet.parent / "missing", "train")


def test_load_split_mixed_sizes_need_size_and_modes_become_rgb(tmp_path):
    imgs = [Image.new("L", (20, 20), 128), Image.new("CMYK", (24, 20), (0, 0, 0, 0)),
            Image.new("RGBA", (20, 20), (255, 0, 0, 128)), Image.new("P", (20, 20))]
    rows = {k: [] for k in SCHEMA.names}
    for i, im in enumerate(imgs):
        buf = io.BytesIO()
        im.save(buf, format="JPEG" if im.mode in ("L", "CMYK") else "PNG")
        for k, v in dict(image=buf.getvalue(), label=i, label_name="x", split="train", source=f"{i}",
                         sha256="", height=im.size[1], width=im.size[0]).items():
            rows[k].append(v)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table(rows, schema=SCHEMA), tmp_path / "pq" / "train.parquet")
    with pytest.raises(FerError, match="different sizes"):
        load_split(tmp_path / "pq", "train")
    x, y = load_split(tmp_path / "pq", "train", size=16)
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 1, 2, 3]
    assert (x[0, 0] == x[0, 1]).all()                                # grayscale -> equal channels
    with pytest.raises(FerError, match="no rows"):
        load_split(tmp_path / "pq", "test")


def test_load_split_process_pool_path(small_parquet, monkeypatch):
    import pipeline.data.loader as L

    monkeypatch.setattr(L, "_POOL_MIN", 1)
    monkeypatch.setattr(L, "_DECODE_CHUNK", 8)
    a, ya = L.load_split(small_parquet, "train", workers=2)
    monkeypatch.setattr(L, "_POOL_MIN", 10 ** 9)
    b, yb = L.load_split(small_parquet, "train")
    assert torch.equal(a, b) and torch.equal(ya, yb)


def test_cpu_slices_and_device_gather_agree():
    import pipeline.data.loader as L

    x = _coded(300, 14, 13)
    ch, cw = 9, 8
    g = torch.Generator().manual_seed(4)
    oy = torch.randint(0, 14 - ch + 1, (300,), generator=g)
    ox = torch.randint(0, 13 - cw + 1, (300,), generator=g)
    fl = torch.rand(300, generator=g) < 0.5
    a = random_crop_flip(x, (ch, cw), generator=torch.Generator().manual_seed(4))
    b = L._gather_crop(x, oy, ox, fl, ch, cw)
    assert torch.equal(a, b)
