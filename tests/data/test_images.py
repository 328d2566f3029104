"""Training images of every common kind load as upright 8-bit RGB; bad ones name the file."""

import json

import numpy as np
import pytest
from PIL import Image

from persona_jax.data.images import DataError, load_image
from persona_jax.data.sources import read_image_folder


def save(path, array, mode=None, **kw):
  Image.fromarray(array, mode=mode).save(path, **kw) if mode else Image.fromarray(array).save(path, **kw)
  return path


def test_modes_are_converted(tmp_path):
  gray = save(tmp_path / "g.png", np.full((16, 20), 100, np.uint8))
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[:8, :, 3] = 255                              # top half opaque red, bottom transparent
  rgba_path = save(tmp_path / "a.png", rgba)
  deep = save(tmp_path / "d.png", np.full((16, 16), 40000, np.uint16))
  g = load_image(gray)
  assert g.shape == (16, 20, 3) and g.dtype == np.uint8 and (g == 100).all()
  a = load_image(rgba_path)
  assert (a[0, 0] == [255, 0, 0]).all() and (a[15, 0] == [255, 255, 255]).all()   # onto white
  d = load_image(deep)
  assert d.dtype == np.uint8 and abs(int(d[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_exif_rotation_is_applied(tmp_path):
  array = np.zeros((10, 20, 3), np.uint8)           # 10 high, 20 wide
  img = Image.fromarray(array)
  exif = img.getexif()
  exif[0x0112] = 6                                  # orientation: rotate 90 CW to display
  img.save(tmp_path / "r.jpg", exif=exif)
  assert load_image(tmp_path / "r.jpg").shape == (20, 10, 3)


def test_truncated_and_unreadable_images_name_the_file(tmp_path):
  good = save(tmp_path / "t.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
  data = good.read_bytes()
  good.write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError, match=r"t\.png: cannot read this image"):
    load_image(good)
  (tmp_path / "x.jpg").write_bytes(b"this is not a jpeg")
  with pytest.raises(DataError, match=r"x\.jpg: cannot read this image"):
    load_image(tmp_path / "x.jpg")


def test_folder_captions_and_skipped_files(tmp_path, caplog):
  for name in ("b.png", "a.png", "c.jpg"):
    save(tmp_path / name, np.zeros((16, 16, 3), np.uint8))
  (tmp_path / "a.txt").write_text("a photo of a toy\n")
  (tmp_path / "notes.md").write_text("hello")
  (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "b caption"}) + "\n")
  with caplog.at_level("WARNING"):
    examples = read_image_folder(tmp_path)
  assert [e.path.name for e in examples] == ["a.png", "b.png", "c.jpg"]
  assert [e.caption for e in examples] == ["a photo of a toy", "b caption", None]
  assert "notes.md" in caplog.text and "a.txt" not in caplog.text
  with pytest.raises(DataError, match="no caption for c.jpg"):
    read_image_folder(tmp_path, need_captions=True)


def test_empty_or_missing_folder(tmp_path):
  with pytest.raises(DataError, match="no images found"):
    read_image_folder(tmp_path)
  with pytest.raises(DataError, match="image folder not found"):
    read_image_folder(tmp_path / "nope")


def test_bad_metadata_line(tmp_path):
  save(tmp_path / "a.png", np.zeros((16, 16, 3), np.uint8))
  (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
  with pytest.raises(DataError, match="line 1"):
    read_image_folder(tmp_path)
