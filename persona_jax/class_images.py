"""Class images for prior preservation: `num` samples of a class prompt from a base model, written
as OUT/class-00000.png ... by the jitted sampler (with several processes, the batches split over
them and the first one writes). Resumable: images already in the folder count
(generated ones are never redrawn; image i always uses the key fold_in(seed, i) at the same place
in the same batch shape, so a resumed run writes the same pixels), and each batch is written as soon as it is sampled.

OUT/class_images.json records the prompt and sampler settings; topping up a folder made for
another prompt is an error (its images would silently teach the wrong class).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
from tqdm.auto import tqdm

from persona_jax.convert.files import write_json
from persona_jax.distributed import is_main, map_over_processes, sync
from persona_jax.data.images import IMAGE_SUFFIXES, DataError
from persona_jax.images import save_png
from persona_jax.text_to_image import (SampleOptions, sampler_name, text_to_image,
                                      with_pipeline_defaults)

log = logging.getLogger(__name__)

METADATA = "class_images.json"


def image_name(index: int) -> str:
  return f"class-{index:05d}.png"


def count_images(folder: Path) -> int:
  """Images in `folder` (by suffix); 0 when it does not exist."""
  if not folder.is_dir():
    return 0
  return sum(1 for f in folder.iterdir()
             if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)


def _check_metadata(folder: Path, record: dict) -> None:
  path = folder / METADATA
  if not path.is_file():
    return
  try:
    saved = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError:
    raise DataError(f"{path}: not valid JSON; delete it if the folder's images are what you want") from None
  if saved.get("prompt") != record["prompt"]:
    raise DataError(f"{folder}: its class images were made for the prompt '{saved.get('prompt')}', "
                    f"not '{record['prompt']}'; use another folder (or delete this one)")
  if saved.get("scheduler", record["scheduler"]) != record["scheduler"]:
    raise DataError(f"{folder}: its class images were sampled with {saved['scheduler']}, not "
                    f"{record['scheduler']}; pass --scheduler {saved['scheduler']} (or use "
                    "another folder)")


def make_class_images(pipe, prompt: str, num: int, out, *, options: SampleOptions = SampleOptions(),
                      negative_prompt: str | None = None, progress: bool = True) -> list[Path]:
  """Tops up `out` to `num` images of `prompt` sampled from `pipe`. Returns the new files."""
  out = Path(out)
  options = with_pipeline_defaults(options, pipe)
  if not prompt:
    raise DataError(f"{out}: class images need a prompt (e.g. 'a photo of a dog')")
  record = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": options.steps,
            "guidance": options.guidance, "seed": options.seed, "height": options.height,
            "width": options.width, "model": str(pipe.path) if pipe.path else None,
            "scheduler": sampler_name(pipe, options)}
  _check_metadata(out, record)
  if is_main():
    out.mkdir(parents=True, exist_ok=True)
  ours = {image_name(i) for i in range(num)}
  others = count_images(out) - sum(1 for n in ours if (out / n).is_file())
  todo = {i for i in range(max(0, num - others)) if not (out / image_name(i)).is_file()}
  sync("class images counted")             # every process has looked before any is written
  if not todo:
    return []
  main = is_main()
  if main and not (out / METADATA).is_file():
    write_json(out / METADATA, record)
  log.info("%s: generating %d class image(s) of '%s' (%d steps, guidance %g)", out, len(todo),
           prompt, options.steps, options.guidance)
  written = []
  bar = tqdm(total=len(todo), desc="class images", unit="img", disable=not (progress and main),
             dynamic_ncols=True)
  try:
    # Image i is always sampled at position i % B of the batch starting at i - i % B (B the
    # batch size), so a redrawn image is bitwise the image it replaces. With several processes
    # each samples every N-th batch and the first one writes them, a round of N at a time.
    bs = max(1, options.batch_size)
    firsts = sorted({i - i % bs for i in todo})
    rounds = jax.process_count()
    for r in range(0, len(firsts), rounds):
      batches = map_over_processes(
          lambda first: text_to_image(pipe, prompt, negative_prompt, bs, options,
                                      start_index=first, progress=False),
          firsts[r: r + rounds])
      for first, images in zip(firsts[r: r + rounds], batches):
        for j, image in enumerate(images):
          if first + j in todo:
            path = out / image_name(first + j)
            written.append(save_png(image, path) if main else path)
            bar.update(1)
  finally:
    bar.close()
  sync("class images written")             # the others read them next
  return written
