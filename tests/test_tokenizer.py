"""The shipped tokenizer is the real SD 1.x CLIP BPE."""

import numpy as np

from persona_jax.tokenizer import load_tokenizer, tokenize


def test_shipped_tokenizer_matches_sd():
  tok = load_tokenizer()
  assert len(tok) == 49408
  ids = tokenize(tok, ["a photo of a dog", "a photo of a cat"])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert list(ids[0, :7]) == [49406, 320, 1125, 539, 320, 1929, 49407]
  assert list(ids[1, :7]) == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert (ids[0, 7:] == 49407).all()                     # SD 1.x pads with EOS
  assert tok.convert_tokens_to_ids("sks</w>") == 48136


def test_sd2_preset_pads_with_exclamation_mark(pipes):
  ids = tokenize(pipes["sd2"].tokenizer, "a dog")
  assert list(ids[0, :5]) == [49406, 320, 1929, 49407, 0]


def test_long_prompts_truncate_to_77():
  ids = tokenize(load_tokenizer(), " ".join(["dog"] * 100))
  assert ids.shape == (1, 77) and ids[0, -1] == 49407
