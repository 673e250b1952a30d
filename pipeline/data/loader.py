"""The training/evaluation loader: decode a shard once, then batch on the device.

RAF-DB and SFEW decode to well under 1 GB, so each worker decodes its shard of the parquet split
once into a uint8 tensor ``[N, 3, H, W]``, moves it to its device, and builds every batch there:
random crop, mirror and small rotation for training, ten-crop (or centre crop) for evaluation,
all as batched tensor ops (one gather from offset arithmetic, one ``grid_sample`` for rotation),
never a PIL transform. The accelerator does not wait on PIL. (On CPU the crop is taken as
per-sample view slices copied by one ``stack``: torch's CPU gather kernels are ~8x slower.)

Sharding is ``row_index % world_size == rank``: no padding and no duplicates, so distributed
evaluation counts every test image exactly once.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.decode import decode_chunk
from pipeline.errors import FerError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_POOL_MIN = 4000   # decode with a process pool from this many images on
_DECODE_CHUNK = 512


# --------------------------------------------------------------------------- reading


def _read_split_table(parquet_dir: str | os.PathLike, split: str, columns: list[str]):
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    d = Path(parquet_dir)
    if not d.exists():
        raise FerError(f"parquet dataset not found: {d}")
    f = d / f"{split}.parquet"
    try:
        if f.is_file():  # the layout ingest writes: one file per split, rows in file order
            return pq.read_table(f, columns=columns)
        dataset = ds.dataset(d, format="parquet")
        return dataset.to_table(columns=columns, filter=ds.field("split") == split)
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise FerError(f"cannot read split {split!r} from {d}: {e}") from e


def load_split(parquet_dir: str | os.PathLike, split: str, *, size: int | None = None,
               rank: int = 0, world_size: int = 1, workers: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode this rank's shard of ``split`` into ``(images uint8 [N,3,H,W], labels int64 [N])``.

    Rows ``i`` with ``i % world_size == rank`` (file order). ``size`` resizes every image to
    ``size x size``; it is required when the split's images differ in size.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise FerError(f"bad shard: rank {rank} of world_size {world_size}")
    meta = _read_split_table(parquet_dir, split, ["label", "height", "width"])
    if meta.num_rows == 0:
        raise FerError(f"split {split!r} of {parquet_dir} has no rows")
    idx = np.arange(rank, meta.num_rows, world_size)
    hs = np.asarray(meta.column("height").to_numpy())
    ws = np.asarray(meta.column("width").to_numpy())
    if size is None:
        if (hs != hs[0]).any() or (ws != ws[0]).any():
            pairs = sorted({(int(h), int(w)) for h, w in zip(hs, ws)})[:3]
            raise FerError(f"split {split!r} of {parquet_dir} has images of different sizes "
                           f"({', '.join(f'{w}x{h}' for h, w in pairs)}...); pass size=")
        size_hw = (int(hs[0]), int(ws[0]))
    else:
        size_hw = (int(size), int(size))
    labels = torch.from_numpy(np.asarray(meta.column("label").to_numpy()).astype(np.int64)[idx])
    if len(idx) == 0:
        return torch.zeros((0, 3, *size_hw), dtype=torch.uint8), labels

    table = _read_split_table(parquet_dir, split, ["image"]).take(idx)
    blobs = table.column("image").to_pylist()
    del table
    chunks = [(blobs[i:i + _DECODE_CHUNK], size) for i in range(0, len(blobs), _DECODE_CHUNK)]
    from pipeline.workers import default_workers, process_pool

    workers = default_workers(workers)
    try:
        if workers > 1 and len(blobs) >= _POOL_MIN:
            with process_pool(min(workers, len(chunks))) as ex:
                arrays = list(ex.map(decode_chunk, chunks))
        else:
            arrays = [decode_chunk(c) for c in chunks]
    except (OSError, ValueError) as e:
        raise FerError(f"cannot decode an image of split {split!r} in {parquet_dir}: {e}") from e
    x = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, labels


# --------------------------------------------------------------------------- tensor ops


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """0..255 images (uint8 or float, channels at dim -3) -> float32, ImageNet-normalised."""
    inv, shift = _norm_consts(x.device, tuple(mean), tuple(std))
    y = x.float() if x.dtype != torch.float32 else x.clone()
    return y.mul_(inv).sub_(shift)


def _norm_consts(device: torch.device, mean: tuple, std: tuple):
    """(1 / (255 std), mean / std) as float32 [3,1,1] on ``device``. Made per call, not cached:
    constants made while torch.export or torch.compile traces are not real tensors, and a cache
    would hand them to every later eager call (two 3-element tensors cost nothing per batch)."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    inv = (1.0 / (s * 255.0)).to(device=device, dtype=torch.float32).view(3, 1, 1)
    return inv, (m / s).to(device=device, dtype=torch.float32).view(3, 1, 1)


def _pair(crop) -> tuple[int, int]:
    if isinstance(crop, int):
        return crop, crop
    ch, cw = crop
    return int(ch), int(cw)


def _check_crop(x: torch.Tensor, ch: int, cw: int) -> tuple[int, int]:
    if x.dim() != 4:
        raise FerError(f"expected images [B,C,H,W], got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if ch > H or cw > W or ch < 1 or cw < 1:
        raise FerError(f"crop {ch}x{cw} does not fit images of {H}x{W}")
    return H, W


def center_crop(x: torch.Tensor, crop) -> torch.Tensor:
    """torchvision ``CenterCrop`` on a batch ``[..., H, W]`` (same rounding)."""
    ch, cw = _pair(crop)
    H, W = x.shape[-2:]
    if ch > H or cw > W:
        raise FerError(f"crop {ch}x{cw} does not fit images of {H}x{W}")
    top = int(round((H - ch) / 2.0))
    left = int(round((W - cw) / 2.0))
    return x[..., top:top + ch, left:left + cw]


def ten_crop(x: torch.Tensor, crop) -> torch.Tensor:
    """``[B,C,H,W] -> [B,10,C,crop,crop]`` in torchvision ``TenCrop`` order: top-left,
    top-right, bottom-left, bottom-right, centre, then the same five of the mirrored image."""
    ch, cw = _pair(crop)
    H, W = _check_crop(x, ch, cw)

    def five(img):
        return [img[..., :ch, :cw], img[..., :ch, W - cw:], img[..., H - ch:, :cw],
                img[..., H - ch:, W - cw:], center_crop(img, (ch, cw))]

    return torch.stack(five(x) + five(x.flip(-1)), dim=1)


def random_crop_flip(x: torch.Tensor, crop, *, generator: torch.Generator, flip_p: float = 0.5,
                     max_rotate_deg: float = 0.0) -> torch.Tensor:
    """Per-sample random crop (every offset ``0..H-crop`` equally likely), horizontal mirror
    with probability ``flip_p`` and, if ``max_rotate_deg > 0``, a rotation by an angle uniform in
    ``[-max_rotate_deg, max_rotate_deg]`` about the crop centre.

    Batched on ``x``'s device; the random draws come from ``generator`` (on its own device).
    Without rotation the result is an exact copy of pixels (same dtype as ``x``): one gather on
    accelerators, per-sample view slices + one ``stack`` on CPU (faster there). With rotation it
    is one bilinear ``grid_sample`` for the batch (float32, still 0..255; pixels beyond the
    image edge repeat the border).
    """
    ch, cw = _pair(crop)
    H, W = _check_crop(x, ch, cw)
    B = x.shape[0]
    gdev = generator.device
    oy = torch.randint(0, H - ch + 1, (B,), generator=generator, device=gdev).to(x.device)
    ox = torch.randint(0, W - cw + 1, (B,), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(B, generator=generator, device=gdev) < flip_p).to(x.device)
    if max_rotate_deg and max_rotate_deg > 0:
        ang = (torch.rand(B, generator=generator, device=gdev) * 2 - 1).to(x.device)
        ang = ang * math.radians(max_rotate_deg)
        return _rotate_crop(x, oy, ox, flip, ang, ch, cw)
    if x.device.type == "cpu":
        # CPU: advanced-indexing kernels are slow on uint8 (~8x slower than this); a crop is a
        # view, so slice views and copy them once with stack. Same result as the gather below.
        oy_l, ox_l, fl_l = oy.tolist(), ox.tolist(), flip.tolist()
        views = [x[i, :, a:a + ch, b:b + cw] for i, (a, b) in enumerate(zip(oy_l, ox_l))]
        views = [v.flip(-1) if f else v for v, f in zip(views, fl_l)]
        return torch.stack(views) if views else x[:, :, :ch, :cw].clone()
    return _gather_crop(x, oy, ox, flip, ch, cw)


def _gather_crop(x, oy, ox, flip, ch, cw) -> torch.Tensor:
    """One gather for the whole batch (accelerators): rows/cols from offset arithmetic, the
    mirror folded into the column index."""
    B, C = x.shape[:2]
    ar_y = torch.arange(ch, device=x.device)
    ar_x = torch.arange(cw, device=x.device)
    rows = oy[:, None] + ar_y                                            # [B, ch]
    cols = ox[:, None] + torch.where(flip[:, None], cw - 1 - ar_x, ar_x)  # [B, cw]
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return x[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def _rotate_crop(x, oy, ox, flip, ang, ch, cw) -> torch.Tensor:
    H, W = x.shape[-2:]
    dev = x.device
    v = torch.arange(ch, device=dev, dtype=torch.float32) - (ch - 1) / 2   # output rows
    u = torch.arange(cw, device=dev, dtype=torch.float32) - (cw - 1) / 2   # output cols
    vv, uu = torch.meshgrid(v, u, indexing="ij")                           # [ch, cw]
    uu = uu[None] * torch.where(flip, -1.0, 1.0)[:, None, None]            # mirror
    vv = vv[None].expand_as(uu)
    cos, sin = torch.cos(ang)[:, None, None], torch.sin(ang)[:, None, None]
    xs = (ox.float() + (cw - 1) / 2)[:, None, None] + cos * uu - sin * vv
    ys = (oy.float() + (ch - 1) / 2)[:, None, None] + sin * uu + cos * vv
    grid = torch.stack([xs / (W - 1) * 2 - 1, ys / (H - 1) * 2 - 1], dim=-1)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=True)


# --------------------------------------------------------------------------- batches


class DeviceBatches:
    """Batches of a decoded split, built on ``device``.

    Training (``train=True``): each epoch a permutation seeded by ``seed + epoch`` (call
    :meth:`set_epoch`), then random crop / mirror / rotation; yields ``(x [B,3,crop,crop] float32
    normalised, y int64)``. Evaluation: the split in order, yielding ten crops
    ``x [B,10,3,crop,crop]`` (or one centre crop ``[B,3,crop,crop]`` with ``center=True``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, crop: int,
                 train: bool, device="cpu", seed: int = 0, max_rotate_deg: float = 0.0,
                 drop_last: bool = False, center: bool = False, flip_p: float = 0.5):
        if images.dim() != 4 or images.shape[1] != 3:
            raise FerError(f"images must be [N,3,H,W], got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise FerError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise FerError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, dtype=torch.int64)
        self.batch_size, self.crop, self.train = int(batch_size), crop, train
        self.seed, self.max_rotate_deg, self.flip_p = int(seed), float(max_rotate_deg), flip_p
        self.drop_last, self.center = drop_last, center
        self.epoch = 0
        _check_crop(self.images[:1], *_pair(crop))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _generator(self) -> torch.Generator:
        try:
            g = torch.Generator(device=self.device)
        except RuntimeError:
            g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return g

    def __iter__(self):
        n, bs = len(self.images), self.batch_size
        stop = (n // bs) * bs if self.drop_last else n
        if self.train:
            g = self._generator()
            order = torch.randperm(n, generator=g, device=g.device).to(self.device)
            for i in range(0, stop, bs):
                idx = order[i:i + bs]
                xb = random_crop_flip(self.images[idx], self.crop, generator=g,
                                      flip_p=self.flip_p, max_rotate_deg=self.max_rotate_deg)
                yield normalize(xb), self.labels[idx]
        else:
            for i in range(0, stop, bs):
                xb = self.images[i:i + bs]
                xb = center_crop(xb, self.crop) if self.center else ten_crop(xb, self.crop)
                yield normalize(xb), self.labels[i:i + bs]
