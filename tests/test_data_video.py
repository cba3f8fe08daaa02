"""Decoding, cropping, resizing and path confinement (vwm.data.video)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_data import BROKEN_KINDS, FRAME_H, FRAME_W, frame_array, truncate, write_mp4
from vwm.data.base import BrokenSampleError
from vwm.data.video import (
    MediaRoot, check_target_size, crop_box, decode_image, decode_video, load_image_sequence, probe_video,
    read_json_list, to_unit_range,
)


def _reference_preprocess(path: str, th: int, tw: int) -> np.ndarray:
    # The reference's BaseDataset.preprocess_image, written out: crop to aspect, LANCZOS, RGB.
    image = Image.open(path)
    w, h = image.size
    if w / h > tw / th:
        cw = int(tw / th * h)
        image = image.crop(((w - cw) // 2, 0, (w + cw) // 2, h))
    elif w / h < tw / th:
        ch = int(th / tw * w)
        image = image.crop((0, (h - ch) // 2, w, (h + ch) // 2))
    return np.asarray(image.resize((tw, th), resample=Image.LANCZOS).convert("RGB"))


@pytest.fixture
def photo(tmp_path) -> str:
    """A 1600x900 JPEG with natural content (matplotlib's sample photo, upscaled, plus sensor-like noise)."""
    import matplotlib

    sample = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    base = Image.open(sample).convert("RGB").crop((0, 144, 512, 432)).resize((1600, 900), Image.BICUBIC)
    noisy = np.asarray(base).astype(np.float32) + np.random.default_rng(0).normal(0, 4, (900, 1600, 3))
    path = str(tmp_path / "photo.jpg")
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def test_crop_box_follows_the_reference_rule():
    assert crop_box(1600, 900, 576, 320) == (0, 6, 1600, 894)  # 16:9 source, 1.8 target: 1600x888
    assert crop_box(1600, 900, 1024, 576) == (0, 0, 1600, 900)  # exactly 16:9
    assert crop_box(1920, 1080, 576, 320) == (0, 7, 1920, 1073)
    assert crop_box(128, 72, 128, 64) == (0, 4, 128, 68)
    assert crop_box(100, 100, 128, 64) == (0, 25, 100, 75)
    assert crop_box(300, 100, 128, 64) == (50, 0, 250, 100)


def test_check_target_size_names_the_field():
    check_target_size(320, 576)
    with pytest.raises(ValueError, match="target_width=500 must be a positive multiple of 64"):
        check_target_size(320, 500)


@pytest.mark.parametrize("size", [(320, 576), (64, 128), (100, 100)])
def test_full_decode_is_bit_identical_to_the_reference(photo, tmp_path, size):
    th, tw = (64, 64) if size == (100, 100) else size
    path = photo
    if size == (100, 100):
        path = str(tmp_path / "square.png")
        Image.open(photo).crop((0, 0, 700, 600)).save(path)
    expected = _reference_preprocess(path, th, tw)
    np.testing.assert_array_equal(decode_image(path, th, tw, draft=False), expected)


def test_jpeg_draft_is_close_to_the_full_decode(photo):
    exact = decode_image(photo, 320, 576, draft=False).astype(np.float64)
    fast = decode_image(photo, 320, 576, draft=True).astype(np.float64)
    psnr = 10 * np.log10(255.0**2 / np.mean((exact - fast) ** 2))
    assert psnr > 40.0
    small = decode_image(photo, 64, 128, draft=True).astype(np.float64)
    small_exact = decode_image(photo, 64, 128, draft=False).astype(np.float64)
    assert 10 * np.log10(255.0**2 / np.mean((small - small_exact) ** 2)) > 40.0


def test_grayscale_cmyk_and_tiny_images_decode_to_rgb(tmp_path):
    gray = str(tmp_path / "gray.jpg")
    Image.fromarray(frame_array(3)[..., 0]).save(gray)
    cmyk = str(tmp_path / "cmyk.jpg")
    Image.fromarray(frame_array(3)).convert("CMYK").save(cmyk)
    tiny = str(tmp_path / "tiny.png")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tiny)
    for path in (gray, cmyk, tiny):
        out = decode_image(path, 64, 128)
        assert out.shape == (64, 128, 3) and out.dtype == np.uint8
    assert abs(int(decode_image(tiny, 64, 64)[10, 10, 2]) - 30) <= 1


@pytest.mark.parametrize("kind", sorted(BROKEN_KINDS))
def test_every_broken_frame_kind_raises_broken_sample_error(tmp_path, kind):
    path = str(tmp_path / ("frame.png" if "png" in kind or kind == "bomb" else "frame.jpg"))
    BROKEN_KINDS[kind](path)
    with pytest.raises(BrokenSampleError) as info:
        decode_image(path, 64, 128)
    assert info.value.path == path
    if kind == "bomb":
        assert "decompression bomb" in info.value.reason


def test_bomb_check_does_not_depend_on_pillow_global(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400000 * 400000)  # what importing nuscenes-devkit does
    path = str(tmp_path / "bomb.png")
    BROKEN_KINDS["bomb"](path)
    with pytest.raises(BrokenSampleError, match="decompression bomb"):
        decode_image(path, 64, 128)


def test_load_image_sequence_layout(tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(frame_array(i)).save(paths[-1], quality=95)
    frames = load_image_sequence(paths, 64, 128)
    assert frames.shape == (3, 3, 64, 128) and frames.dtype == torch.uint8
    assert [round(frames[i, 0].float().mean().item() / 8) for i in range(3)] == [0, 1, 2]


def test_to_unit_range_matches_reference_arithmetic():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    ref = (x.float() / 255.0) * 2.0 - 1.0
    out = to_unit_range(x)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert out.min() == -1.0 and out.max() == 1.0


def test_mp4_decode_is_frame_accurate_and_resized(tmp_path):
    path = write_mp4(str(tmp_path / "v.mp4"), 30)
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height) == (30, FRAME_W, FRAME_H) and info.fps == 10.0
    frames = decode_video(path, [3, 17, 29, 4], info, 64, 128)
    assert frames.shape == (4, 3, 64, 128) and frames.dtype == torch.uint8
    assert [round(frames[i, 0].float().mean().item() / 8) for i in range(4)] == [3, 17, 29, 4]
    small = decode_video(path, [5, 6], info, 64, 64)  # decoded at reduced size, then crop + Lanczos
    assert small.shape == (2, 3, 64, 64)
    assert [round(small[i, 0].float().mean().item() / 8) for i in range(2)] == [5, 6]


def test_broken_videos_raise_broken_sample_error(tmp_path):
    good = write_mp4(str(tmp_path / "good.mp4"), 20)
    info = probe_video(good)
    with pytest.raises(BrokenSampleError, match="requested from a 20-frame video"):
        decode_video(good, [19, 20], info, 64, 128)
    trunc = truncate(write_mp4(str(tmp_path / "trunc.mp4"), 20), 0.5)
    with pytest.raises(BrokenSampleError):
        probe_video(trunc)
    with pytest.raises(BrokenSampleError):
        decode_video(trunc, [0, 1], info, 64, 128)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(BrokenSampleError):
        probe_video(str(tmp_path / "empty.mp4"))


def test_media_root_confines_paths(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(b"")
    os.symlink(outside, root / "link_dir")
    os.symlink(outside / "x.jpg", root / "a" / "link.jpg")
    media = MediaRoot(str(root))
    assert media.path_problem("a/b.jpg") is None
    assert media.path_problem("/etc/passwd") == "absolute path"
    assert media.path_problem("a/../../etc") == "contains '..'"
    assert media.path_problem("a\x00b") == "contains a NUL byte"
    assert media.path_problem("a" * 5000).startswith("longer than")
    assert media.path_problem(3) == "not a non-empty string"
    assert media.dir_inside("a") and not media.dir_inside("link_dir")
    with pytest.raises(BrokenSampleError, match="symlink escapes"):
        media.open_path("a/link.jpg")
    with pytest.raises(FileNotFoundError, match="data_root='.*missing' is not an existing directory"):
        MediaRoot(str(tmp_path / "missing"))


def test_read_json_list_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="anno_file='.*nope.json' is not an existing file"):
        read_json_list(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_json_list(str(bad))
    obj = tmp_path / "obj.json"
    obj.write_text("{}")
    with pytest.raises(ValueError, match="must hold a JSON list"):
        read_json_list(str(obj))
    (tmp_path / "a.json").write_text("[1, 2]")
    (tmp_path / "b.json").write_text("[3]")
    assert read_json_list([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == [1, 2, 3]
