"""Caffe's DataTransformer (graphc.data.transform) and image resizing (graphc.data.images)
against naive loop implementations."""
import itertools

import numpy as np
import pytest

from graphc.data.images import resize_bilinear
from graphc.data.transform import Transformer, load_mean
from graphc.errors import OpError
from graphc.frontend.caffemodel import array_to_blob


def naive_transform(img, h_off, w_off, crop, mirror, mean, mean_values, scale):
    """Caffe's DataTransformer::Transform, element by element, in float64."""
    C, H, W = img.shape
    oh, ow = (crop, crop) if crop else (H, W)
    out = np.full((C, oh, ow), np.nan)
    for c, h, w in itertools.product(range(C), range(oh), range(ow)):
        v = float(img[c, h_off + h, w_off + w])
        if mean is not None:
            v -= float(mean[c, h_off + h, w_off + w])
        elif len(mean_values):
            v -= float(mean_values[c] if len(mean_values) > 1 else mean_values[0])
        out[c, h, ow - 1 - w if mirror else w] = v * scale
    return out


def rel_err(a, b):
    assert not np.isnan(b).any()
    return np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30)


def matching(out, img, offsets, mirrors, **kw):
    """The (h_off, w_off, mirror) whose naive result equals ``out``, or None."""
    for (h, w), m in itertools.product(offsets, mirrors):
        ref = naive_transform(img, h, w, mirror=m, **kw)
        if out.shape == ref.shape and rel_err(out, ref) < 1e-6:
            return h, w, m
    return None


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_train_random_crop_and_mirror(rng, dtype):
    C, H, W, crop = 3, 7, 9, 5
    img = (rng.integers(0, 256, (C, H, W)) if dtype == np.uint8
           else rng.standard_normal((C, H, W))).astype(dtype)
    mean = rng.uniform(0, 255, (C, H, W)).astype(np.float32)
    scale = float(np.float32(rng.uniform(0.001, 2)))
    t = Transformer({"crop_size": crop, "mirror": True, "scale": scale}, train=True, mean=mean)
    offsets = list(itertools.product(range(H - crop + 1), range(W - crop + 1)))
    seen = set()
    for _ in range(60):
        out = t(img, rng)
        assert out.dtype == np.float32 and out.shape == (C, crop, crop)
        hit = matching(out, img, offsets, (False, True), crop=crop, mean=mean,
                       mean_values=[], scale=scale)
        assert hit is not None, "output is no crop/mirror of the input"
        seen.add(hit)
    assert {m for _, _, m in seen} == {False, True}        # mirror is random
    assert len({(h, w) for h, w, _ in seen}) > 3            # crops are random


def test_test_phase_center_crop(rng):
    C, H, W, crop = 2, 8, 11, 4
    img = rng.integers(0, 256, (C, H, W)).astype(np.uint8)
    t = Transformer({"crop_size": crop, "mean_value": [10.5, 99.25], "scale": 0.5}, train=False)
    out = t(img, rng)
    ref = naive_transform(img, (H - crop) // 2, (W - crop) // 2, crop, False, None,
                          [10.5, 99.25], 0.5)
    assert rel_err(out, ref) < 1e-6
    # a TEST-phase transformer is deterministic
    assert np.array_equal(t(img, rng), out)


def test_mirror_is_random_in_test_phase_too(rng):
    """Caffe draws the mirror (param.mirror() && Rand(2)) whatever the phase."""
    img = rng.integers(0, 256, (1, 3, 6)).astype(np.uint8)
    t = Transformer({"mirror": True}, train=False)
    outs = {t(img, rng).tobytes() for _ in range(40)}
    assert len(outs) == 2


def test_single_mean_value_and_no_crop(rng):
    img = rng.integers(0, 256, (3, 4, 5)).astype(np.uint8)
    t = Transformer({"mean_value": [127.0], "scale": 0.0078125}, train=True)
    ref = naive_transform(img, 0, 0, 0, False, None, [127.0], 0.0078125)
    assert rel_err(t(img, rng), ref) < 1e-6


def test_mean_file_binaryproto(tmp_path, rng):
    C, H, W, crop = 3, 6, 6, 3
    mean = rng.uniform(0, 255, (1, C, H, W)).astype(np.float32)
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(array_to_blob(mean).SerializeToString())
    assert np.array_equal(load_mean(str(path)), mean[0])
    # relative to source_dir when not found from the working directory
    assert np.array_equal(load_mean("mean.binaryproto", str(tmp_path)), mean[0])
    img = rng.integers(0, 256, (C, H, W)).astype(np.uint8)
    t = Transformer({"mean_file": str(path), "crop_size": crop}, train=False)
    ref = naive_transform(img, 1, 1, crop, False, mean[0], [], 1.0)
    assert rel_err(t(img, rng), ref) < 1e-6


def test_transform_errors(tmp_path):
    with pytest.raises(OpError, match="both mean_file and mean_value"):
        Transformer({"mean_file": "m.binaryproto", "mean_value": [1.0]})
    with pytest.raises(OpError, match="larger than"):
        Transformer({"crop_size": 9}).out_shape(3, 8, 10)
    with pytest.raises(OpError, match="mean_value entries"):
        Transformer({"mean_value": [1.0, 2.0]}).out_shape(3, 8, 8)
    with pytest.raises(OpError, match="mean_file blob"):
        Transformer(mean=np.zeros((3, 8, 8), np.float32)).out_shape(3, 8, 9)
    with pytest.raises(OpError, match="does not exist") as e:
        Transformer({"mean_file": "nowhere.binaryproto"}, source_dir=str(tmp_path))
    assert str(tmp_path / "nowhere.binaryproto") in str(e.value)


def naive_resize(img, oh, ow):
    """OpenCV INTER_LINEAR: src = (dst + 0.5) * in / out - 0.5, clamped to the border."""
    C, H, W = img.shape

    def src(d, n_in, n_out):
        x = (d + 0.5) * n_in / n_out - 0.5
        i = int(np.floor(x))
        f = x - i
        if i < 0:
            i, f = 0, 0.0
        if i >= n_in - 1:
            i, f = n_in - 1, 0.0
        return i, min(i + 1, n_in - 1), f

    out = np.full((C, oh, ow), -1.0)
    for c, y, x in itertools.product(range(C), range(oh), range(ow)):
        y0, y1, fy = src(y, H, oh)
        x0, x1, fx = src(x, W, ow)
        v = ((1 - fy) * ((1 - fx) * img[c, y0, x0] + fx * img[c, y0, x1])
             + fy * ((1 - fx) * img[c, y1, x0] + fx * img[c, y1, x1]))
        out[c, y, x] = np.floor(v + 0.5)
    return out


@pytest.mark.parametrize("size", [(5, 7), (13, 4), (6, 6)])
def test_resize_bilinear(rng, size):
    img = rng.integers(0, 256, (3, 6, 6)).astype(np.uint8)
    out = resize_bilinear(img, *size)
    assert out.dtype == np.uint8 and out.shape == (3,) + size
    ref = naive_resize(img.astype(np.float64), *size)
    assert (ref >= 0).all()
    assert np.abs(out.astype(np.float64) - ref).max() <= 1   # float rounding at .5 ties
    assert rel_err(out, ref) < 1e-2
