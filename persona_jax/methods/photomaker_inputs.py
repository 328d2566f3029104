"""The inputs of PhotoMaker sampling (methods/photomaker.py, photomaker_verify.py): the base check,
both tokenizers with the trigger word, the prompt check, the ID images' CLIP pixels and v2's face
embeddings (from a .npy or face/analysis.py)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np

from persona_jax.errors import ConfigError, ModelFileError, PersonaError

log = logging.getLogger(__name__)

TRIGGER_WORD = "img"


def check_base(pipe, config, path) -> None:
  """An SDXL base whose prompt embeddings are the ID encoder's fuse width."""
  if not pipe.is_sdxl:
    where = pipe.path or "the model"
    raise ConfigError(f"--photomaker: PhotoMaker samples on SDXL bases and {where} is SD 1.x/2.x; "
                      "pass --model an SDXL folder")
  width = pipe.text_encoder_config.hidden_size + pipe.text_encoder_2_config.hidden_size
  if width != config.fuse_dim:
    raise ModelFileError(f"{path}: the ID encoder fuses {config.fuse_dim}-wide prompt embeddings; "
                         f"this SDXL base's are {width} wide (a file for another base?)")


def trigger_tokenizers(pipe, word: str):
  """Both tokenizers with the trigger word added as one special token (as the official
  `add_tokens([word], special_tokens=True)`), and its id (the same in both)."""
  if not word or word != word.strip():
    raise ConfigError(f"--trigger-word {word!r}: a non-empty word without surrounding spaces")
  out, ids = [], []
  for tok in (pipe.tokenizer, pipe.tokenizer_2):
    tok = copy.deepcopy(tok)
    if tok.add_tokens([word], special_tokens=True) != 1:
      raise ConfigError(f"--trigger-word {word!r} is already a token of the tokenizer; use a word "
                        f"that is not (the official one: {TRIGGER_WORD})")
    out.append(tok)
    ids.append(tok.convert_tokens_to_ids(word))
  if ids[0] != ids[1]:
    raise ConfigError(f"--trigger-word {word!r}: the two tokenizers give it different ids "
                      f"({ids[0]}, {ids[1]}); use tokenizers of one vocabulary")
  return out[0], out[1], ids[0]


def check_prompt(tokenizer, trigger_id: int, word: str):
  """The prompt check of the official pipeline (one trigger word, after a class word), as a
  function of a prompt returning it unchanged (Sampling.expand_prompt)."""
  from persona_jax.tokenizer import tokenize

  def expand(prompt: str) -> str:
    ids = tokenize(tokenizer, [prompt])[0]
    where = np.flatnonzero(ids == trigger_id)
    if len(where) != 1:
      raise ConfigError(f"--prompt '{prompt}': PhotoMaker needs the trigger word '{word}' exactly "
                        f"once (found {len(where)}), right after the class word, e.g. 'a photo "
                        f"of a man {word}'")
    if where[0] < 2:
      raise ConfigError(f"--prompt '{prompt}': the trigger word '{word}' must follow the class "
                        f"word it stands for, e.g. 'a man {word}'")
    return prompt
  return expand


def face_embeddings(config, images, embedding_file=None, pack=None):
  """v2: (the images kept, their face embeddings [N, D]) from `embedding_file` ([N, D] or [D])
  or the face analysis of `pack`; v1: (images, None). See the module docstring for the rules."""
  given = [f for f, v in (("--face-embedding", embedding_file), ("--face-analysis", pack)) if v]
  if config.version == "v1":
    if given:
      raise ConfigError(f"{given[0]}: a PhotoMaker v1 file uses no face embedding; leave it out")
    return images, None
  if not given:
    raise ConfigError("PhotoMaker v2 needs a face embedding of the ID images: --face-analysis "
                      "PACK_DIR (an insightface pack, e.g. buffalo_l) or --face-embedding FILE.npy")
  if len(given) > 1:
    raise ConfigError("--face-embedding and --face-analysis: give one of them")
  if embedding_file:
    return images, _embedding_file(Path(embedding_file), len(images), config.id_embeddings_dim)
  from persona_jax.data.images import load_image
  from persona_jax.face.analysis import (PHOTOMAKER_V2_DET_SIZES, PIPELINE_PICKS,
                                         load_face_analysis, pick)
  analysis = load_face_analysis(pack)
  kept, embeds = [], []
  for path in images:
    faces = analysis.analyze(load_image(path), det_sizes=PHOTOMAKER_V2_DET_SIZES)
    if not faces:
      log.warning("%s: no face found; PhotoMaker v2 leaves this ID image out", path)
      continue
    face = pick(faces, PIPELINE_PICKS["photomaker_v2"], str(path))     # the first detected
    kept.append(path)
    embeds.append(face.embedding)
  if not kept:
    raise PersonaError(f"no face found in any --image ({', '.join(map(str, images))}); PhotoMaker "
                       "v2 needs photos where a face is clearly visible")
  out = np.stack(embeds).astype(np.float32)
  if out.shape[1] != config.id_embeddings_dim:
    raise ModelFileError(f"{pack}: its recognizer gives {out.shape[1]}-d embeddings; the file's "
                         f"ID encoder reads {config.id_embeddings_dim}")
  return kept, out


def _embedding_file(path: Path, n: int, width: int) -> np.ndarray:
  try:
    x = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ConfigError(f"--face-embedding {path}: cannot read it as a .npy array ({e})") from None
  x = np.asarray(x, np.float32)
  if x.ndim == 1:
    x = np.tile(x[None], (n, 1))
  if x.ndim != 2 or x.shape != (n, width):
    raise ConfigError(f"--face-embedding {path}: shape {list(np.shape(x))}; need [{width}] or "
                      f"[{n}, {width}] (one raw ArcFace embedding per --image)")
  if not np.isfinite(x).all():
    raise ConfigError(f"--face-embedding {path}: holds NaN or inf")
  return x


def id_pixels(config, images) -> np.ndarray:
  """[1, N, S, S, 3] CLIP pixels of the ID images (CLIPImageProcessor's defaults at the tower's
  size: 224 for the official files)."""
  from persona_jax.data.clip_images import CLIPImageProcessorConfig, preprocess_image
  from persona_jax.data.images import load_image
  processor = CLIPImageProcessorConfig.for_image_size(config.vision.image_size)
  return np.stack([preprocess_image(load_image(p), processor) for p in images])[None]
