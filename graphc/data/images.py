"""Images as Caffe sees them: decoded with OpenCV's conventions, held as CHW uint8 arrays.

Caffe reads images with OpenCV, so a colour image has 3 channels in **BGR** order, a
grayscale one 1 channel; alpha is dropped.  Pillow does the decoding here (JPEG, PNG, ...),
and the arrays are put into OpenCV's layout.  Caffe's ``ReadImageToCVMat`` resizes with
``cv::resize`` (bilinear, pixel centres aligned: ``src = (dst + 0.5) * in/out - 0.5``,
clamped at the borders); ``resize_bilinear`` follows that rule (computed in floating
point and rounded, so a value may differ by 1 from OpenCV's fixed-point arithmetic).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import OpError

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        raise OpError("reading images needs the 'pillow' package",
                      hint="pip install pillow") from None
    return Image


def _to_array(img, color: bool | None) -> np.ndarray:
    """A PIL image -> CHW uint8.  color: True = 3 channels BGR, False = 1 channel,
    None = as stored (OpenCV's IMREAD_ANYCOLOR: gray stays gray, anything else is BGR)."""
    if color is None:
        color = img.mode not in _GRAY_MODES
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit data: OpenCV without IMREAD_ANYDEPTH keeps the high byte
        a = np.asarray(img, dtype=np.uint32) >> 8
        img = _pil().fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if color:
        a = np.asarray(img.convert("RGB"), dtype=np.uint8)[:, :, ::-1]   # RGB -> BGR
        return np.ascontiguousarray(a.transpose(2, 0, 1))
    return np.asarray(img.convert("L"), dtype=np.uint8)[None].copy()


def decode_image(data: bytes, color: bool | None = None,
                 what: str = "an encoded image") -> np.ndarray:
    """Decode JPEG/PNG/... bytes to a CHW uint8 array (see ``_to_array`` for ``color``)."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_array(img, color)
    except (OSError, ValueError, SyntaxError) as e:
        raise OpError(f"cannot decode {what}: {e}",
                      hint="the record is not a readable JPEG/PNG image; rebuild the data "
                           "set") from None


def read_image(path, new_height: int = 0, new_width: int = 0, color: bool = True) -> np.ndarray:
    """Caffe's ReadImageToCVMat: read ``path`` (colour: 3 channels BGR, else 1 channel) and
    resize to (new_height, new_width) when both are > 0.  Returns CHW uint8."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.load()
            a = _to_array(img, color)
    except FileNotFoundError:
        raise OpError(f"image '{path}' does not exist",
                      hint="check the path in the image list (and root_folder)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise OpError(f"cannot read image '{path}': {e}",
                      hint="the file is not a readable image; fix or remove its line") from None
    if new_height > 0 and new_width > 0:
        a = resize_bilinear(a, new_height, new_width)
    return a


def _axis_weights(n_out: int, n_in: int):
    scale = n_in / n_out
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    low = i0 < 0
    i0[low], frac[low] = 0, 0.0
    high = i0 >= n_in - 1
    i0[high], frac[high] = n_in - 1, 0.0
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, frac


def resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV-style INTER_LINEAR resize of a CHW uint8 image to (height, width)."""
    c, h, w = img.shape
    if (h, w) == (height, width):
        return img.copy()
    y0, y1, fy = _axis_weights(height, h)
    x0, x1, fx = _axis_weights(width, w)
    a = img.astype(np.float64)
    rows = a[:, y0, :] * (1 - fy)[None, :, None] + a[:, y1, :] * fy[None, :, None]
    out = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def encode_image(img: np.ndarray, fmt: str = "png") -> bytes:
    """CHW uint8 (BGR or gray) -> PNG/JPEG bytes, as cv::imencode would write them."""
    Image = _pil()
    if img.shape[0] == 1:
        pil = Image.fromarray(np.ascontiguousarray(img[0]))
    else:
        pil = Image.fromarray(np.ascontiguousarray(img[::-1].transpose(1, 2, 0)))
    buf = io.BytesIO()
    fmt = fmt.lower().lstrip(".")
    if fmt in ("jpg", "jpeg"):
        pil.save(buf, format="JPEG", quality=95)   # OpenCV's default JPEG quality
    elif fmt == "png":
        pil.save(buf, format="PNG")
    else:
        raise OpError(f"cannot encode images as '{fmt}'", hint="use png or jpg")
    return buf.getvalue()


def image_format(path) -> str | None:
    """'png' / 'jpg' from a file name, else None."""
    ext = Path(str(path)).suffix.lower().lstrip(".")
    return {"png": "png", "jpg": "jpg", "jpeg": "jpg"}.get(ext)


def stored_channels(path) -> int | None:
    """1 or 3: the channels an image file decodes to natively (None if unreadable)."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            return 1 if img.mode in _GRAY_MODES else 3
    except (OSError, ValueError, SyntaxError):
        return None
