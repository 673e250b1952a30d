"""The one decoder (pipeline.data.decode.decode) behind ingest's validation, the loader, `fer
predict` and the MLflow model: 16-bit and float images, EXIF orientation, the pixel cap, and
ordinary 8-bit RGB unchanged. Every image is built here."""
from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from pipeline import evaluate as E
from pipeline.data.decode import DecodeError, decode, decode_chunk
from pipeline.data.validate import check_bytes, configured
from pipeline.data.classes import CLASSES
from pipeline.data.ingest import SCHEMA
from pipeline.data.loader import load_split
from pipeline.data.synthetic import render
from pipeline.errors import FerError
from pipeline.infer.cli import read_photo
from pipeline.infer.predictor import Predictor, decode_image, to_model_input
from pipeline.infer.pyfunc import FerPyfunc

BOMB_MSG = "10000x10000 = 100 megapixels exceeds the 40 megapixel limit"


def _enc(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _parquet(tmp_path, blob: bytes, height: int, width: int):
    """A one-row train split, as ingest writes it."""
    d = tmp_path / "pq"
    d.mkdir(exist_ok=True)
    row = dict(image=[blob], label=[0], label_name=["x"], split=["train"], source=["a"],
               sha256=[""], height=[height], width=[width])
    pq.write_table(pa.table(row, schema=SCHEMA), d / "train.parquet")
    return d


def _pyfunc_input(blob: bytes, size: int, monkeypatch) -> np.ndarray:
    """What the MLflow model feeds the network for base64 bytes (the serving JSON form)."""
    seen = []

    def fake_ten_crop(model, x, crop, device=None, **speed):  # amp, channels_last
        seen.append(x)
        return torch.full((len(x), len(CLASSES)), 1 / len(CLASSES)), None

    monkeypatch.setattr(E, "ten_crop_probabilities", fake_ten_crop)
    m = FerPyfunc()
    m.predictor = Predictor((torch.nn.Identity(), {"classes": list(CLASSES), "crop": size,
                                                   "image_size": size}), device="cpu")
    m.predict(None, pd.DataFrame({"image": [base64.b64encode(blob).decode()]}))
    return seen[0][0].permute(1, 2, 0).numpy()


def _every_path(blob: bytes, tmp_path, monkeypatch, size: int = 16) -> tuple[dict, dict]:
    """The image through ingest validation, the loader, `fer predict` and pyfunc.

    Returns (ingest's report, {path: array}); native-size arrays under ``*_native``."""
    rep = check_bytes(blob)
    assert rep["ok"], rep["reason"]
    x, _ = load_split(_parquet(tmp_path, blob, rep["height"], rep["width"]), "train")
    xs, _ = load_split(tmp_path / "pq", "train", size=size)
    photo = tmp_path / "photo.img"
    photo.write_bytes(blob)
    return rep, {
        "loader_native": x[0].permute(1, 2, 0).numpy(),
        "decode_chunk_native": decode_chunk(([blob], None))[0],
        "predict_native": read_photo(str(photo)),
        "decode_image_native": decode_image(blob),
        "loader": xs[0].permute(1, 2, 0).numpy(),
        "decode_chunk": decode_chunk(([blob], size))[0],
        "to_model_input": to_model_input(blob, size),
        "pyfunc": _pyfunc_input(blob, size, monkeypatch),
    }


def _all_equal(arrays: dict, native: bool) -> np.ndarray:
    """The arrays of one group (native size or resized) are identical; returns one."""
    group = {k: v for k, v in arrays.items() if k.endswith("_native") == native}
    ref = next(iter(group.values()))
    for k, v in group.items():
        assert v.dtype == np.uint8 and np.array_equal(v, ref), k
    return ref


# --------------------------------------------------------------------------- 16-bit and float

GRADIENT = np.arange(256, dtype=np.uint8)[None, :].repeat(8, 0)   # 8 x 256, 0..255 across


@pytest.mark.parametrize("mode,fmt,values", [
    ("I;16", "PNG", GRADIENT.astype(np.uint16) * 257),              # 16-bit grayscale PNG
    ("I;16B", "TIFF", GRADIENT.astype(np.uint16) * 257),            # big-endian 16-bit
    ("I", "TIFF", GRADIENT.astype(np.int32) * 256 + 200),           # high byte kept
    ("F", "TIFF", GRADIENT.astype(np.float32) / 255),               # 0..1 -> x255
    ("F", "TIFF", GRADIENT.astype(np.float32) + 0.2),               # 0..255 as is (rounded)
])
def test_wide_modes_decode_to_the_gradient_everywhere(mode, fmt, values, tmp_path, monkeypatch):
    im = (Image.frombytes(mode, values.shape[::-1], values.astype(">u2").tobytes())
          if mode == "I;16B" else Image.fromarray(values))
    blob = _enc(im, fmt)
    assert Image.open(io.BytesIO(blob)).mode == mode
    if mode != "F":   # what PIL's convert("RGB") alone makes of it: nearly all white
        assert (np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")) == 255).mean() > 0.9
    rep, arrays = _every_path(blob, tmp_path, monkeypatch)
    assert rep["mode"] == mode and (rep["height"], rep["width"]) == (8, 256)
    native = _all_equal(arrays, native=True)
    assert np.array_equal(native, np.repeat(GRADIENT[:, :, None], 3, axis=2))
    _all_equal(arrays, native=False)


def test_48_bit_png_keeps_the_high_byte():
    """PIL opens a 16-bit-per-channel RGB PNG as 8-bit RGB (high byte); decode agrees with that
    and with the 16-bit gray rule. A raw PNG is written here: PIL cannot save one."""
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    px = np.array([[[0x1234, 0x8000, 0xFFFF], [0x00FF, 0x0100, 0x7FFF]]], dtype=">u2")
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" + px[0].tobytes())) + chunk(b"IEND", b""))
    assert np.array_equal(decode(png), (px >> 8).astype(np.uint8))
    assert check_bytes(png)["ok"]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK"])
def test_other_modes_are_pil_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    im = rgb.convert(mode) if mode != "PA" else rgb.convert("P").convert("PA")
    blob = _enc(im, "JPEG" if mode == "CMYK" else ("TIFF" if mode == "PA" else "PNG"))
    want = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    assert np.array_equal(decode(blob), want)


def test_palette_with_transparency_decodes_without_warning():
    im = Image.new("P", (6, 4), 3)
    im.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90])
    blob = _enc(im, "PNG", transparency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = decode(blob)
    assert a.shape == (4, 6, 3) and (a == [70, 80, 90]).all()


# --------------------------------------------------------------------------- EXIF orientation


def test_exif_orientation_is_applied_the_same_everywhere(tmp_path, monkeypatch):
    """A 40x24 JPEG tagged orientation 6 (rotate 90 clockwise to view) is 24 wide, 40 high in
    ingest's report and identical through the loader, `fer predict` and the MLflow model."""
    rng = np.random.default_rng(1)
    stored = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    blob = _enc(stored, "JPEG", exif=exif, quality=95)
    rep, arrays = _every_path(blob, tmp_path, monkeypatch, size=20)
    assert (rep["width"], rep["height"]) == (24, 40)
    native = _all_equal(arrays, native=True)
    plain = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))      # unrotated decode
    assert native.shape == (40, 24, 3) and np.array_equal(native, np.rot90(plain, k=-1))
    assert np.array_equal(native, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(blob)))))
    _all_equal(arrays, native=False)


# --------------------------------------------------------------------------- pixel cap


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """10000x10000 (100 megapixels) of black: about 100 KB as a PNG."""
    return _enc(Image.new("L", (10000, 10000)))


@pytest.fixture
def no_load(monkeypatch):
    """Any pixel decode fails the test: the refusal must come from the header."""
    def load(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(Image.Image, "load", load)


def test_pixel_cap_refused_from_the_header_everywhere(bomb, tmp_path, monkeypatch, no_load):
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # PIL's DecompressionBombWarning must not escape either
        # ingest validation
        rep = check_bytes(bomb)
        assert not rep["ok"] and rep["reason"] == f"decompression bomb: {BOMB_MSG}"
        assert (rep["width"], rep["height"], rep["mode"], rep["format"]) == (10000, 10000, "L", "PNG")
        # the loader, in-process and as its pool task
        with pytest.raises(DecodeError, match=BOMB_MSG):
            decode_chunk(([bomb], 32))
        with pytest.raises(FerError, match=BOMB_MSG) as e:
            load_split(_parquet(tmp_path, bomb, 10000, 10000), "train", size=32)
        assert "\n" not in str(e.value)
        # fer predict
        photo = tmp_path / "huge.png"
        photo.write_bytes(bomb)
        with pytest.raises(FerError, match=BOMB_MSG) as e:
            read_photo(str(photo))
        assert str(e.value) == f"{photo}: decompression bomb: {BOMB_MSG}"
        with pytest.raises(FerError, match=BOMB_MSG):
            to_model_input(bomb, 32)
        # the MLflow model (base64 bytes, as served)
        with pytest.raises(ValueError, match=BOMB_MSG) as e:
            _pyfunc_input(bomb, 32, monkeypatch)
        assert "\n" not in str(e.value)


def test_pils_own_bomb_error_becomes_the_same_one_line(bomb, monkeypatch, no_load):
    """Above twice PIL's MAX_IMAGE_PIXELS, PIL raises in Image.open before the header check."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000_000)
    with pytest.raises(DecodeError) as e:
        decode(bomb)
    assert str(e.value) == "decompression bomb: 100 megapixels exceeds the 40 megapixel limit"
    with configured():   # ingest's pool setting: PIL's guard at the same 40 MP
        assert check_bytes(bomb)["reason"] == str(e.value)
    with pytest.raises(FerError, match="100 megapixels exceeds the 40 megapixel limit"):
        decode_image(bomb)


def test_other_failures_are_one_line():
    jpeg = render(0, "rafdb", seed=3, index=0)
    for blob, word in [(b"", "zero-byte file"), (b"not an image at all" * 9, "not an image"),
                       (jpeg[: len(jpeg) // 2], "truncated or corrupt image")]:
        rep = check_bytes(blob)
        assert not rep["ok"] and rep["reason"].startswith(word) and "\n" not in rep["reason"]
        with pytest.raises(FerError, match=word):
            decode_image(blob)


# --------------------------------------------------------------------------- ordinary images


@pytest.mark.parametrize("layout,index", [("rafdb", 0), ("rafdb", 5), ("sfew", 2)])
def test_ordinary_rgb_unchanged_vs_plain_pil(layout, index):
    """The synthetic data (8-bit RGB, no EXIF) decodes byte-identically to the old
    ``open().convert("RGB").resize(BILINEAR)``: the dvc.lock hashes stay valid."""
    rng = np.random.default_rng(index)
    blobs = [render(index % 7, layout, seed=11, index=index),
             _enc(Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)), "PNG")]
    for blob in blobs:
        im = Image.open(io.BytesIO(blob)).convert("RGB")
        assert np.array_equal(decode_chunk(([blob], None))[0], np.asarray(im))
        for size in (24, 112):
            want = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
            assert np.array_equal(decode_chunk(([blob], size))[0], want)
            assert np.array_equal(to_model_input(blob, size), want)
