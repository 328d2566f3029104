"""The prompt tokenizer (tokenizer.py `load_prompt_tokenizer`): the ids of transformers'
CLIPTokenizer for every prompt (README's, odd unicode and whitespace, special tokens typed in a
prompt, long prompts cut), SD 1.x's and SD 2.x's padding; read back from the user cache folder
without importing transformers."""

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from persona_jax import tokenizer as tk

ROOT = Path(__file__).resolve().parents[1]


def prompts() -> list[str]:
  readme = (ROOT / "README.md").read_text()
  found = re.findall(r"--prompt[= ][\"']([^\"']+)[\"']", readme)
  rng = random.Random(0)
  ranges = [(0x20, 0x7e), (0xa0, 0x24f), (0x300, 0x36f), (0x370, 0x3ff), (0x400, 0x4ff),
            (0x3040, 0x30ff), (0x4e00, 0x4fff), (0xac00, 0xac80), (0x1f300, 0x1f64f),
            (0x2000, 0x206f), (0xff00, 0xffef), (0x0, 0x1f), (0x600, 0x6ff), (0xfb00, 0xfb4f)]
  extras = [" ", "  ", "\t", "\n", ",", "'s", "!", "<|endoftext|>", "<|startoftext|>"]
  odd = []
  for _ in range(300):
    text = ""
    for _ in range(rng.randint(1, 30)):
      low, high = rng.choice(ranges)
      text += chr(rng.randint(low, high)) + (rng.choice(extras) if rng.random() < 0.2 else "")
    odd.append(text)
  words = ["a", "photo", "of", "sks", "dog", "don't", "CAT", "naïve", "3.14", "x-ray", "@home"]
  long = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 90))) for _ in range(20)]
  return found + odd + long + ["", "   ", "日本の猫", "a\u200bb", "e\u0301", "ﬁne"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  return {"sd1": tk.shipped_tokenizer_dir(), "sd2": tk.write_tokenizer(root / "sd2", "sd2")}


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_same_ids_as_clip_tokenizer(folders, preset, tmp_path, monkeypatch):
  monkeypatch.setenv("PERSONA_JAX_CACHE", str(tmp_path))
  tk._load_prompt_tokenizer.cache_clear()
  converted = tk.load_prompt_tokenizer(folders[preset])
  tk._load_prompt_tokenizer.cache_clear()
  read_back = tk.load_prompt_tokenizer(folders[preset])
  tk._load_prompt_tokenizer.cache_clear()
  assert isinstance(read_back, tk.PromptTokenizer) and read_back.model_max_length == 77
  assert [p.suffix for p in (tmp_path / "tokenizers").iterdir()] == [".json"]
  slow = tk.load_tokenizer(folders[preset])
  texts = prompts()
  for length in (None, 12):
    expected = tk.tokenize(slow, texts, length)
    assert (tk.tokenize(converted, texts, length) == expected).all()
    assert (tk.tokenize(read_back, texts, length) == expected).all()


def test_read_back_without_transformers(tmp_path):
  code = ("import sys; from persona_jax import tokenizer as tk; "
          "ids = tk.tokenize(tk.load_prompt_tokenizer(), ['a red ball']); "
          "print(type(tk.load_prompt_tokenizer()).__name__, 'transformers' in sys.modules)")
  env = dict(os.environ, PYTHONPATH=str(ROOT), PERSONA_JAX_CACHE=str(tmp_path))
  runs = [subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120) for _ in range(2)]
  assert [r.stdout.split() for r in runs] == [["PromptTokenizer", "True"],
                                              ["PromptTokenizer", "False"]], runs[-1].stderr


def test_with_ftfy_installed_the_prompt_tokenizer_is_transformers(monkeypatch):
  """CLIPTokenizer fixes text with ftfy when it is installed; the converted backend would not."""
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: object() if name == "ftfy" else find_spec(name, *a))
  assert not isinstance(tk.load_prompt_tokenizer(), tk.PromptTokenizer)
  monkeypatch.undo()
  assert isinstance(tk.load_prompt_tokenizer(), tk.PromptTokenizer)
