"""Image folders with optional captions: sidecar `NAME.txt` files or a `metadata.jsonl`
(`{"file_name": ..., "text": ...}` per line, the Hugging Face imagefolder convention), and
optional subject masks: `NAME.mask.png` beside `NAME.png` / `NAME.jpg` / ... (white = subject,
the image's size; read by methods that mask their condition image, e.g. InstantBooth)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from persona_jax.data.images import IMAGE_SUFFIXES, DataError

log = logging.getLogger(__name__)

CAPTION_KEYS = ("text", "caption", "prompt")
# Files of ours that live beside images and are not skipped with a warning.
SIDECAR_FILES = ("metadata.jsonl", "class_images.json")
MASK_SUFFIX = ".mask.png"


@dataclasses.dataclass(frozen=True)
class Example:
  path: Path
  caption: str | None = None
  mask: Path | None = None          # NAME.mask.png, when it exists


def mask_path(image: Path) -> Path:
  """Where the subject mask of an image file lies: NAME.mask.png beside NAME.EXT."""
  return image.with_name(image.stem + MASK_SUFFIX)


def _metadata(folder: Path) -> dict[str, str]:
  meta = folder / "metadata.jsonl"
  if not meta.is_file():
    return {}
  out = {}
  for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      name = row["file_name"]
      caption = next(row[k] for k in CAPTION_KEYS if k in row)
    except (json.JSONDecodeError, KeyError, StopIteration, TypeError):
      raise DataError(f"{meta}: line {n} is not a JSON object with 'file_name' and one of "
                      f"{', '.join(CAPTION_KEYS)}") from None
    if not (folder / name).is_file():
      raise DataError(f"{meta}: line {n} names '{name}', which is not in {folder}")
    out[name] = str(caption)
  return out


def read_image_folder(folder, *, need_captions: bool = False) -> list[Example]:
  """The images of `folder` (sorted by name) with their captions, if any.

  Files that are not images (by suffix) are skipped with a warning; caption files are not
  counted as such. A folder without images is an error naming it.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise DataError(f"{folder}: image folder not found")
  captions = _metadata(folder)
  examples, skipped = [], []
  for f in sorted(folder.iterdir()):
    if f.name.startswith(".") or f.is_dir() or f.name in SIDECAR_FILES:
      continue
    if f.name.endswith(MASK_SUFFIX):
      continue
    if f.suffix.lower() not in IMAGE_SUFFIXES:
      if not (f.suffix == ".txt" and any(f.with_suffix(s).exists() for s in IMAGE_SUFFIXES)):
        skipped.append(f.name)
      continue
    caption = captions.get(f.name)
    sidecar = f.with_suffix(".txt")
    if caption is None and sidecar.is_file():
      caption = sidecar.read_text(encoding="utf-8").strip()
    mask = mask_path(f)
    examples.append(Example(f, caption, mask if mask.is_file() else None))
  if skipped:
    log.warning("%s: skipping %d file(s) that are not images: %s", folder, len(skipped),
                ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
  if not examples:
    raise DataError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
  if need_captions:
    missing = [e.path.name for e in examples if not e.caption]
    if missing:
      raise DataError(f"{folder}: no caption for {missing[0]}"
                      + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                      + " (add NAME.txt files or a metadata.jsonl, or use prompt templates)")
  return examples
