"""The Q-Former's tokenizer: bert-base-uncased's vocabulary, ids as diffusers' deprecated
BLIP-Diffusion pipeline makes them, the model folder's own vocabulary first, the size check."""

import hashlib
import pathlib
import runpy

import numpy as np
import pytest

from persona_jax.errors import ModelFileError
from persona_jax.qformer_tokenizer import (check_vocab_size, load_qformer_tokenizer,
                                           shipped_qformer_tokenizer_dir, tokenize_category)

ROOT = pathlib.Path(__file__).resolve().parents[1]
STRINGS = ["dog", "Dog", "DOG", "teddy bear", "Teddy-Bear!", "cat, dog; bird.", "café naïve résumé",
           "Ünïcödé Straße", "zzqxjvbw", "pneumonoultramicroscopicsilicovolcanoconiosis",
           "red  backpack\t", "日本語のテスト", "don't", "", "a plush toy of a teddy bear"]
LONG = " ".join(["a very long subject category"] * 30)


@pytest.fixture(scope="module")
def references():
  """The pipeline's tokenizer (transformers' BertTokenizer from the shipped vocab.txt, uncased,
  truncating on the right, [DEC] added) and transformers' pure-Python BertTokenizerLegacy."""
  from transformers import BertTokenizer
  from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
  folder = str(shipped_qformer_tokenizer_dir())
  pipe = BertTokenizer.from_pretrained(folder, truncation_side="right", do_lower_case=True)
  pipe.add_special_tokens({"bos_token": "[DEC]"})
  legacy = BertTokenizerLegacy(f"{folder}/vocab.txt", do_lower_case=True)
  legacy.add_special_tokens({"bos_token": "[DEC]"})
  return pipe, legacy


def test_shipped_vocabulary_is_bert_base_uncased():
  data = (shipped_qformer_tokenizer_dir() / "vocab.txt").read_bytes()
  script = runpy.run_path(str(ROOT / "scripts" / "build_qformer_tokenizer.py"))
  assert hashlib.sha256(data).hexdigest() == script["VOCAB_SHA256"]
  vocab = {t: i for i, t in enumerate(data.decode().splitlines())}
  assert len(vocab) == 30522
  assert {t: vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")} == {
      "[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
  assert (vocab["the"], vocab["dog"], vocab["cat"]) == (1996, 3899, 4937)
  tok = load_qformer_tokenizer()
  assert len(tok) == 30523 and tok.convert_tokens_to_ids("[DEC]") == 30522
  ids, _ = tokenize_category(tok, "Hello, my dog is cute")      # transformers' docs' example
  assert ids.tolist() == [[101, 7592, 1010, 2026, 3899, 2003, 10140, 102]]


def test_ids_equal_transformers_bert_tokenizer(references):
  """The pipeline's call (padding to the longest, [CLS] ... [SEP]) and a fixed length (padded,
  long text cut) give transformers' ids, fast and pure-Python implementations alike."""
  tok = load_qformer_tokenizer()
  texts = STRINGS + [LONG]
  for ref in references:
    want = ref(texts, return_tensors="np", padding=True)
    ids, mask = tokenize_category(tok, texts)
    assert ids.dtype == mask.dtype == np.int32
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    for length in (5, 16):
      want = ref(texts, return_tensors="np", padding="max_length", truncation=True,
                 max_length=length)
      ids, mask = tokenize_category(tok, texts, max_length=length)
      np.testing.assert_array_equal(ids, want["input_ids"])
      np.testing.assert_array_equal(mask, want["attention_mask"])
  assert not (ids == 30522).any()                                # [DEC] is never an input id


def test_fixed_length_only_pads_short_categories():
  """Padding past the longest adds masked [PAD]s only; a long text keeps [CLS] first, [SEP] last."""
  tok = load_qformer_tokenizer()
  ids, mask = tokenize_category(tok, STRINGS)
  fixed_ids, fixed_mask = tokenize_category(tok, STRINGS, max_length=32)
  width = ids.shape[1]
  np.testing.assert_array_equal(fixed_ids[:, :width], ids)
  assert (fixed_ids[:, width:] == 0).all() and (fixed_mask[:, width:] == 0).all()
  np.testing.assert_array_equal(fixed_mask[:, :width], mask)
  long_ids, long_mask = tokenize_category(tok, LONG, max_length=12)
  assert long_ids.shape == (1, 12) and long_mask.all()
  assert long_ids[0, 0] == 101 and long_ids[0, -1] == 102


def test_multi_word_category_is_one_text():
  tok = load_qformer_tokenizer()
  ids, _ = tokenize_category(tok, ["teddy bear"])
  words = [tok(w, add_special_tokens=False)["input_ids"] for w in ("teddy", "bear")]
  assert ids[0].tolist() == [101, *words[0], *words[1], 102]


def test_model_folder_tokenizer_takes_precedence(tmp_path):
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "dog", "teddy", "bear", "##s"]
  (tmp_path / "qformer_tokenizer").mkdir()
  (tmp_path / "qformer_tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n")
  tok = load_qformer_tokenizer(tmp_path)
  assert len(tok) == len(words) + 1                               # with [DEC]
  ids, mask = tokenize_category(tok, ["Teddy bears", "dog"])
  assert ids.tolist() == [[2, 6, 7, 8, 3], [2, 5, 3, 0, 0]]
  assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
  assert len(load_qformer_tokenizer(tmp_path / "elsewhere")) == 30523   # no folder: shipped
  check_vocab_size(tok, len(words) + 1, tmp_path / "qformer")


def test_vocab_size_mismatch_is_one_line_error(tmp_path):
  tok = load_qformer_tokenizer()
  check_vocab_size(tok, 30523, "qformer")
  with pytest.raises(ModelFileError, match=r"qformer/x.safetensors: .* 30522 rows .* 30523 tokens"
                     r".*qformer_tokenizer/") as e:
    check_vocab_size(tok, 30522, "qformer/x.safetensors")
  assert "\n" not in str(e.value)
  (tmp_path / "qformer_tokenizer").mkdir()
  with pytest.raises(ModelFileError, match="qformer_tokenizer: not a BERT tokenizer folder"):
    load_qformer_tokenizer(tmp_path)
