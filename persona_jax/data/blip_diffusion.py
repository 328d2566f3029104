"""BLIP-Diffusion's training examples and the arrays a step reads (docs/blip_diffusion_training.md).

An example is a subject input image (what the Q-Former sees, with its category word), a target
image (what the UNet learns to denoise) and a caption. LAVIS's fine-tuning data
(subject_driven_t2i_dataset.py) uses each subject image as both, with the caption "a {category}";
stage-2 pre-training (the paper's) puts the subject on a random background for the input and keeps
the original image as the target. Category and caption go through LAVIS's `blip_caption` text
processor (`blip_caption` here: lower case, `.!"()*#:;~` to spaces, at most 50 words).

Arrays (`example_arrays`, a leading example axis; keys of data/batch.py):
  pixels          [N, R, R, 3] float32 in [-1, 1]   the target (VAE-encoded in the step)
  blip_pixels     [N, S, S, 3] float32              the subject input rescaled and normalized with
                                                    the folder's mean and std (BlipImageProcessor;
                                                    images already at S x S)
  category_ids    [N, C] int32                      the category's BERT ids, [CLS] words [SEP],
                                                    padded with [PAD] to C (tokenize_category)
  category_mask   [N, C] int32                      1 for tokens, 0 for padding
  ids             [N, L - Q] int32                  the caption's CLIP ids padded to L - Q (the
                                                    context text encoder inserts the Q query
                                                    embeddings at ctx_begin_pos: L in all), as the
                                                    pipeline pads a prompt; LAVIS trains unpadded
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from persona_jax.data.batch import BLIP_PIXELS, CATEGORY_IDS, CATEGORY_MASK, IDS, PIXELS
from persona_jax.qformer_tokenizer import tokenize_category
from persona_jax.tokenizer import tokenize

MAX_WORDS = 50                       # BlipCaptionProcessor's max_words
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


@dataclasses.dataclass(frozen=True)
class SubjectExample:
  subject: np.ndarray        # uint8 [S, S, 3] the Q-Former's input image
  target: np.ndarray         # uint8 [R, R, 3] the image the UNet denoises
  category: str              # the subject's category, the Q-Former's text ("dog")
  caption: str               # the text around the query embeddings ("a dog on the beach")


def blip_caption(text: str) -> str:
  """LAVIS's BlipCaptionProcessor.pre_caption: lower case, punctuation to spaces, runs of spaces
  to one, stripped, cut to 50 words."""
  text = _SPACES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).rstrip("\n").strip(" ")
  return " ".join(text.split(" ")[:MAX_WORDS])


def training_caption(category: str, context: str = "") -> str:
  """"a {category}" (LAVIS's fine-tuning caption), then `context` when given ("a ball on grass");
  the query embeddings go at ctx_begin_pos 2, between "a" and the category word."""
  return blip_caption(f"a {category} {context}")


def example_arrays(examples: list[SubjectExample], *, clip_tokenizer, qformer_tokenizer,
                   mean, std, num_query_tokens: int, category_length: int = 16) -> dict:
  """The examples' arrays (module docstring) for a run whose Q-Former has `num_query_tokens`."""
  subject = np.stack([e.subject for e in examples]).astype(np.float32) / 255.0
  target = np.stack([e.target for e in examples]).astype(np.float32) / 127.5 - 1.0
  blip = (subject - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  ids, mask = tokenize_category(qformer_tokenizer, [blip_caption(e.category) for e in examples],
                                max_length=category_length)
  text_length = clip_tokenizer.model_max_length - num_query_tokens
  return {PIXELS: target, BLIP_PIXELS: blip, CATEGORY_IDS: ids, CATEGORY_MASK: mask,
          IDS: tokenize(clip_tokenizer, [e.caption for e in examples], max_length=text_length)}
