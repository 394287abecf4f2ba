"""Caffe's DataTransformer: crop, mirror, mean subtraction and scaling of one image.

For an image of C x H x W (uint8 pixels or float values), in Caffe's order:

1. ``mirror``: when set, each image is flipped left-right with probability 1/2.  Caffe
   draws this in every phase (``param.mirror() && Rand(2)``); prototxts turn mirror off
   for TEST themselves.
2. ``crop_size`` (a square crop_size x crop_size window): at a random offset at TRAIN,
   centred at TEST (offset ``(H - crop_size) / 2``, rounded down).
3. the mean is subtracted: ``mean_file`` (a C x H x W blob of the *uncropped* size, cropped
   at the same offset as the image) or ``mean_value`` (one per channel, or one for all).
4. the result is multiplied by ``scale``.

Output[c, h, w] = (in[c, h_off + h, w_off + w'] - mean) * scale with w' = W_out-1-w when
mirrored; all in float32, as Caffe computes it.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import GraphcError, OpError

#: TransformationParameter defaults, in attribute form
DEFAULT_TRANSFORM = {"scale": 1.0, "mirror": False, "crop_size": 0, "mean_file": None,
                     "mean_value": [], "force_color": False, "force_gray": False}


def transform_attrs(tp) -> dict:
    """A TransformationParameter message -> the attribute dict used here."""
    d = {"scale": float(tp.scale), "mirror": bool(tp.mirror), "crop_size": int(tp.crop_size),
         "mean_file": tp.mean_file if tp.HasField("mean_file") else None,
         "mean_value": [float(v) for v in tp.mean_value],
         "force_color": bool(tp.force_color), "force_gray": bool(tp.force_gray)}
    check_transform(d)
    return d


def check_transform(p: dict) -> None:
    if p["mean_file"] is not None and p["mean_value"]:
        raise OpError("transform_param gives both mean_file and mean_value",
                      hint="give only one of mean_file and mean_value")
    if p["force_color"] and p["force_gray"]:
        raise OpError("transform_param sets both force_color and force_gray",
                      hint="set at most one of force_color and force_gray")


def resolve_path(path: str, source_dir: str | None, what: str, hint: str) -> str:
    """Caffe opens paths relative to the working directory; graphc also tries the
    prototxt's directory (``source_dir``).  Returns the first that exists, else raises an
    OpError naming every path tried."""
    tried = [path]
    if source_dir and not os.path.isabs(path):
        tried.append(os.path.join(source_dir, path))
    for p in tried:
        if os.path.exists(p):
            return p
    names = " and ".join(dict.fromkeys(f"'{os.path.abspath(p)}'" for p in tried))
    raise OpError(f"{what} '{path}' does not exist (tried {names})",
                  hint=f"{hint}; or feed the layer's blobs instead of reading them "
                       f"(graphc dump/compile: --input BLOB=D1,D2,... for every top)")


def load_mean(path: str, source_dir: str | None = None) -> np.ndarray:
    """A mean file (binaryproto BlobProto) as a C x H x W float32 array."""
    from ..frontend.caffemodel import read_binaryproto
    p = resolve_path(path, source_dir, "mean_file",
                     "fix transform_param.mean_file (made by compute_image_mean), or run from "
                     "the directory the path is relative to")
    try:
        mean = read_binaryproto(p)
    except GraphcError as e:
        raise OpError(f"cannot read mean_file '{p}': {e.message}", hint=e.hint) from None
    shape = mean.shape
    if len(shape) < 3 or int(np.prod(shape[:-3], dtype=np.int64)) != 1:
        raise OpError(f"mean_file '{p}' holds a blob of shape {list(shape)}, not one image",
                      hint="a mean file is 1 x C x H x W (as compute_image_mean writes it)")
    return np.ascontiguousarray(mean.reshape(shape[-3:]), dtype=np.float32)


class Transformer:
    """Applies one layer's transform_param; ``train`` selects random (TRAIN) or centre
    (TEST) crops.  ``mean`` may be passed directly (else ``mean_file`` is read)."""

    def __init__(self, params: dict | None = None, train: bool = False,
                 source_dir: str | None = None, mean: np.ndarray | None = None):
        p = dict(DEFAULT_TRANSFORM, **(params or {}))
        check_transform(p)
        self.scale = np.float32(p["scale"])
        self.mirror = bool(p["mirror"])
        self.crop = int(p["crop_size"])
        self.train = bool(train)
        self.mean_values = np.asarray(p["mean_value"], dtype=np.float32)
        self.force_color = bool(p["force_color"])
        self.force_gray = bool(p["force_gray"])
        self.mean = mean
        if self.mean is None and p["mean_file"] is not None:
            self.mean = load_mean(p["mean_file"], source_dir)

    @property
    def decode_color(self) -> bool | None:
        """How an encoded record is decoded: forced colour/gray, else as stored."""
        return True if self.force_color else (False if self.force_gray else None)

    def out_shape(self, c: int, h: int, w: int) -> tuple[int, int, int]:
        """The transformed shape of a C x H x W image (checks it against the params)."""
        if self.crop and (h < self.crop or w < self.crop):
            raise OpError(f"crop_size {self.crop} is larger than the {h} x {w} image",
                          hint=f"use crop_size <= {min(h, w)}, or larger images")
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise OpError(f"the mean_file blob is {list(self.mean.shape)} but the images are "
                          f"{[c, h, w]}",
                          hint="the mean must have the images' uncropped channels x height x "
                               "width; recompute it for this data set")
        if len(self.mean_values) not in (0, 1, c):
            raise OpError(f"{len(self.mean_values)} mean_value entries for {c}-channel images",
                          hint=f"give one mean_value, or {c} (one per channel)")
        return (c, self.crop, self.crop) if self.crop else (c, h, w)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c, h, w = img.shape
        oc, oh, ow = self.out_shape(c, h, w)
        mirror = self.mirror and bool(rng.integers(2))
        h_off = w_off = 0
        if self.crop:
            if self.train:
                h_off = int(rng.integers(h - self.crop + 1))
                w_off = int(rng.integers(w - self.crop + 1))
            else:
                h_off, w_off = (h - self.crop) // 2, (w - self.crop) // 2
        x = img[:, h_off:h_off + oh, w_off:w_off + ow].astype(np.float32)
        if self.mean is not None:
            x -= self.mean[:, h_off:h_off + oh, w_off:w_off + ow]
        elif len(self.mean_values):
            mv = np.broadcast_to(self.mean_values, (c,)) if len(self.mean_values) == 1 \
                else self.mean_values
            x -= mv[:, None, None]
        x *= self.scale
        if mirror:
            x = x[:, :, ::-1]
        return np.ascontiguousarray(x)
