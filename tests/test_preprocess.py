"""Decoding to upright 8-bit RGB and the evaluation preprocessing, checked on real files and against
torchvision's evaluation transform (the rule the pretrained backbones were trained with)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from edgetransfer.errors import DataError
from edgetransfer.preprocess import load_image, normalize, preprocess, resize_and_crop, to_rgb
from edgetransfer.spec import InputSpec

PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # no normalisation: outputs are pixel / 255


def rgb_noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def load_strict(path) -> Image.Image:
    """load_image with every warning an error: conversions must not rely on Pillow's warned fallbacks."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_image(path)


# ---- decoding: every mode ends up as 8-bit RGB ---------------------------------------------------

def test_grayscale_L(tmp_path):
    arr = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    img = load_strict(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (8, 6)
    out = np.asarray(img)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)


def test_rgba_drops_alpha(tmp_path):
    arr = np.zeros((4, 5, 4), dtype=np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2], arr[..., 3] = 10, 120, 230, 77
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    img = load_strict(tmp_path / "a.png")
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img)[0, 0], [10, 120, 230])


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (6, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 5] + [0] * (768 - 9))
    pal.putpixel((0, 0), 2)
    # per-entry alpha (a tRNS chunk read back as bytes): Pillow warns on a direct P -> RGB conversion,
    # so load_strict also proves the image goes through RGBA
    pal.save(tmp_path / "p.png", transparency=bytes([0, 128, 255]))
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P" and isinstance(check.info["transparency"], bytes)
    img = load_strict(tmp_path / "p.png")
    assert img.mode == "RGB" and img.size == (6, 4)
    out = np.asarray(img)
    np.testing.assert_array_equal(out[1, 1], [10, 200, 30])
    np.testing.assert_array_equal(out[0, 0], [250, 5, 5])


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_greyscale_is_scaled_not_clipped(tmp_path, fmt):
    arr = np.array([[0, 32896, 65535, 257 * 200]], dtype=np.uint16)
    path = tmp_path / f"g16.{fmt.lower()}"
    Image.fromarray(arr).save(path, format=fmt)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really a 16-bit image on disk
    out = np.asarray(load_strict(path))
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 200])  # mid-grey stays mid-grey, not white
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_in_memory_modes():
    for mode in ("I;16", "I;16B"):
        img = Image.new(mode, (3, 2), 32896)
        assert np.asarray(to_rgb(img))[0, 0].tolist() == [128, 128, 128], mode


def test_float_image_in_unit_range():
    img = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [128, 128, 128]


def test_exif_orientation_6_is_applied(tmp_path):
    # Stored 40 wide x 20 high, red marker top-left; orientation 6 = "rotate 90 degrees clockwise to view",
    # so the upright image is 20 x 40 with the marker at the top-RIGHT.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "rot.jpg") as raw:
        assert raw.size == (40, 20) and raw.getexif().get(0x0112) == 6
    img = load_strict(tmp_path / "rot.jpg")
    assert img.size == (20, 40)
    r, g, b = img.getpixel((17, 2))
    assert r > 200 and g < 50 and b < 50, "marker must be top-right"
    r, g, b = img.getpixel((2, 2))
    assert b > 200 and r < 50, "top-left must be background"
    # applying to_rgb again (preprocess does) must not rotate a second time
    assert to_rgb(img).size == (20, 40)
    spec = InputSpec.square(16)
    with Image.open(tmp_path / "rot.jpg") as raw:
        raw.load()
        np.testing.assert_array_equal(preprocess(raw, spec), preprocess(img, spec))


def test_unreadable_files_are_data_errors(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    noise = rgb_noise(64, 64)
    trunc = tmp_path / "trunc.jpg"
    noise.save(trunc, quality=90)
    trunc.write_bytes(trunc.read_bytes()[:-trunc.stat().st_size // 2])
    for bad in (empty, trunc, tmp_path / "missing.png"):
        with pytest.raises(DataError) as ei:
            load_image(bad)
        assert ei.value.exit_code == 2 and str(bad) in str(ei.value) and ei.value.path == bad


# ---- colour order --------------------------------------------------------------------------------

def test_bgr_swaps_channels():
    img = rgb_noise(20, 16, seed=3)
    rgb = preprocess(img, InputSpec(height=16, width=16, resize_size=16, **PLAIN))
    bgr = preprocess(img, InputSpec(height=16, width=16, resize_size=16, color_order="BGR", **PLAIN))
    np.testing.assert_array_equal(bgr, rgb[::-1])
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    out = normalize(red, InputSpec(height=8, width=8, resize_size=8, color_order="BGR", **PLAIN))
    assert out[2].min() == 1.0 and out[0].max() == 0.0


def test_mean_std_are_in_color_order():
    # The spec documents mean/std "in color_order": with BGR, mean[0] applies to the blue channel.
    grey = Image.new("RGB", (8, 8), (255, 255, 255))
    spec = InputSpec(height=8, width=8, resize_size=8, color_order="BGR", mean=(0.1, 0.2, 0.3), std=(1, 1, 1))
    out = normalize(grey, spec)
    np.testing.assert_allclose(out[:, 0, 0], [0.9, 0.8, 0.7], atol=1e-6)


# ---- geometry ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(300, 200), (200, 300), (256, 256), (1000, 257)])
def test_shorter_center_crop_shape(size):
    out = preprocess(rgb_noise(*size), InputSpec())
    assert out.shape == (3, 224, 224) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    spec = InputSpec(height=120, width=160, resize_size=181)
    assert resize_and_crop(rgb_noise(*size), spec).size == (160, 120)
    assert preprocess(rgb_noise(*size), spec).shape == (3, 120, 160)


@pytest.mark.parametrize("size", [(300, 200), (90, 50)])
def test_stretch_shape(size):
    spec = InputSpec(height=100, width=60, resize_mode="stretch")
    assert resize_and_crop(rgb_noise(*size), spec).size == (60, 100)
    assert preprocess(rgb_noise(*size), spec).shape == (3, 100, 60)


def test_normalize_values():
    img = Image.new("RGB", (8, 8), (255, 0, 128))
    spec = InputSpec(height=8, width=8, resize_size=8)
    out = normalize(img, spec)
    expect = (np.array([1.0, 0.0, 128 / 255]) - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(out[:, 3, 3], expect, rtol=1e-6)


# ---- torchvision's evaluation transform ----------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(317, 211), (211, 317), (256, 300), (255, 255), (100, 80)])
@pytest.mark.parametrize("crop", [(224, 224, 256), (120, 160, 181)])
def test_matches_torchvision_eval_transform(interpolation, size, crop):
    torch = pytest.importorskip("torch")
    v2 = pytest.importorskip("torchvision.transforms.v2")
    from torchvision.transforms import InterpolationMode

    h, w, resize = crop
    spec = InputSpec(height=h, width=w, resize_size=resize, interpolation=interpolation)
    img = rgb_noise(*size, seed=size[0] * 7 + size[1])
    tf = v2.Compose([
        v2.Resize(resize, interpolation=InterpolationMode(interpolation), antialias=True),
        v2.CenterCrop((h, w)),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(spec.mean), list(spec.std)),
    ])
    ref = tf(img).numpy()
    ours = preprocess(img, spec)
    assert ours.shape == ref.shape == (3, h, w)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(200, 100), (100, 200), (64, 64), (30, 90)])
def test_letterbox_keeps_the_whole_image_and_pads_with_the_mean(size):
    """Every source pixel survives (borders are where inspection defects often are); the padding
    normalises to exactly zero."""
    w, h = size
    img = Image.new("RGB", size, (255, 0, 0))
    spec = InputSpec(height=64, width=64, resize_mode="letterbox", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                     interpolation="nearest")
    out = preprocess(img, spec)
    assert out.shape == (3, 64, 64)
    content = np.isclose(out[0], 1.0) & np.isclose(out[1], -1.0)  # red after (x - 0.5) / 0.5
    pad = np.isclose(out, 0.0, atol=2 / 255).all(axis=0)  # 128/255 is the nearest 8-bit grey to 0.5
    assert (content | pad).all()
    rows, cols = np.nonzero(content)
    # aspect kept: the content box has the image's proportions, centred
    assert abs((cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1) - w / h) < 0.1
    assert abs((cols.min() + cols.max()) / 2 - 31.5) <= 1 and abs((rows.min() + rows.max()) / 2 - 31.5) <= 1
    assert cols.max() - cols.min() + 1 == 64 or rows.max() - rows.min() + 1 == 64


def test_letterbox_of_a_square_image_is_the_stretch_and_keeps_the_border():
    img = rgb_noise(96, 96, seed=5)
    letter = InputSpec(height=64, width=64, resize_mode="letterbox")
    stretch = InputSpec(height=64, width=64, resize_mode="stretch")
    np.testing.assert_array_equal(preprocess(img, letter), preprocess(img, stretch))
    # the crop rule drops the outer ring: a mark on the border is gone from its input, not from letterbox's
    marked = Image.new("RGB", (96, 96), (0, 0, 0))
    marked.paste((255, 255, 255), (0, 40, 4, 56))
    crop = InputSpec(height=64, width=64, resize_size=73)
    assert preprocess(marked, crop).max() < preprocess(marked, letter).max()
