"""Rebuilds the shipped CLIP tokenizer files (persona_jax/assets/tokenizer/) offline.

The OpenAI CLIP BPE that SD 1.x/2.x use ships inside the PyPI package `open-clip-torch`
(`open_clip/bpe_simple_vocab_16e6.txt.gz`). This turns it into the Hugging Face files
(`vocab.json` with 49408 entries, `merges.txt` with 48894 merges) that transformers'
CLIPTokenizer reads. Recipe: reference/formats.md 5.2, offline_assets.md 5.1.

  pip install open-clip-torch --no-deps && python scripts/build_tokenizer.py [OUT_DIR]
"""

import gzip
import importlib.util
import json
import sys
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable-unicode table."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def build(out: Path) -> None:
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    sys.exit("open-clip-torch is not installed: pip install open-clip-torch --no-deps")
  bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
  lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
  merges = [tuple(line.split()) for line in lines]
  vocab = list(bytes_to_unicode().values())
  vocab += [v + "</w>" for v in vocab]
  vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  assert len(vocab) == 49408, len(vocab)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "vocab.json", "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
  with open(out / "merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
  with open(out / "special_tokens_map.json", "w") as f:
    json.dump(special, f, indent=2)
  with open(out / "tokenizer_config.json", "w") as f:
    json.dump({**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
               "do_lower_case": True, "clean_up_tokenization_spaces": True,
               "errors": "replace"}, f, indent=2)
  print(f"wrote {out} ({len(vocab)} tokens, {len(merges)} merges)")


if __name__ == "__main__":
  default = Path(__file__).resolve().parents[1] / "persona_jax" / "assets" / "tokenizer"
  build(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
