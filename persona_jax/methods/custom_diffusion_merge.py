"""`persona-jax merge`: Custom Diffusion's closed-form merge of separately trained concepts
(Kumari et al. 2023, section 3.2 and appendix B; methods.md 3.4).

For every cross-attention key/value matrix W (torch layout [out, in]; our kernels are W^T):
  W_hat = argmin_W || (W - W0) C_reg^T ||_F   subject to   W C^T = V
where W0 is the base matrix, C [s, in] holds the text features of every concept's target words
("<new1> cat" and "photo of a <new1> cat", past BOS and the "photo of a" prefix, through EOS),
V [out, s] is each run's own trained matrix applied to its concept's features, and C_reg [n, in]
the features of ~200 regularization captions (every token after BOS through EOS). Solution:
  d = C (C_reg^T C_reg)^-1,   W_hat = W0 + (V - W0 C^T) (d C^T)^-1 d.
Text features are the context the cross-attention reads (the text conditioning's): SD 1.x/2.x
the text encoder's last hidden state, SDXL both encoders' penultimate hidden states concatenated
(in = 2048 on SDXL: the default captions give ~2090 feature rows, just enough).
The merged result has the same layout as a run's (methods/custom_diffusion.py), with every
run's modifier-token rows (in every text encoder); a token name used by two runs is renamed for
the later one.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import re
from pathlib import Path

import jax
import numpy as np

from persona_jax import tree
from persona_jax.data.batch import TIME_IDS
from persona_jax.diffusion.conditioning import TextConditioning, text_encoders
from persona_jax.errors import ConfigError, ModelFileError, PersonaError
from persona_jax.methods import custom_diffusion as cd
from persona_jax.methods import result_file
from persona_jax.methods.spec import Command
from persona_jax.tokenizer import tokenize_prompts, tokenizers_with_tokens

log = logging.getLogger(__name__)

KV = re.compile(r"unet/.*/attn2/to_(k|v)/kernel")
PREFIX = "photo of a "          # the second target prompt of each concept, as the paper's code


def constrained_merge(w0, c, v, c_reg):
  """The closed-form constrained least squares above (float64).

  Args:
    w0: [out, in] base matrix. c: [s, in] target features. v: [out, s] target outputs.
    c_reg: [n, in] regularization features (n >= in for a unique solution).
  Returns:
    [out, in] W with W c^T = v that moves c_reg's outputs least.
  """
  w0, c, v, c_reg = (np.asarray(x, np.float64) for x in (w0, c, v, c_reg))
  gram = c_reg.T @ c_reg                                             # [in, in]
  d = np.linalg.solve(gram, c.T).T                                   # [s, in] = C gram^-1
  delta = np.linalg.solve((d @ c.T).T, (v - w0 @ c.T).T).T           # [out, s]
  return w0 + delta @ d


def default_reg_captions() -> list[str]:
  """200 generic captions shipped as package data (the paper uses 200 LAION captions)."""
  text = (importlib.resources.files("persona_jax") / "assets" / "regularization_captions.txt").read_text()
  return [line.strip() for line in text.splitlines() if line.strip()]


def text_features(pipe, tokenizers, rows: dict, prompts: list[str],
                  skips: list[int]) -> list[np.ndarray]:
  """Per prompt, the cross-attention context (TextConditioning's: SDXL both encoders' penultimate
  states, [.., D1 + D2]) at positions skip .. EOS (inclusive): [n_i, D] each. `tokenizers`: one
  per text encoder with the added tokens; `rows`: their embeddings by params key ({"tokens":
  [N, D1] (, "tokens_2": [N, D2])}, ids after the vocabulary). One compilation: prompts go
  through in padded batches of 32."""
  inputs = tokenize_prompts(tokenizers, prompts)                             # {"ids": [P, 77], ..}
  length = inputs["ids"].shape[1]
  lengths = [min(len(tokenizers[0](p)["input_ids"]), length) for p in prompts]
  params = {e: pipe.params[e] for e in text_encoders(pipe.params)}
  params.update({k: jax.numpy.asarray(v) for k, v in rows.items()})
  models, conditioning = pipe.models(), TextConditioning(token_rows=True)
  encode = jax.jit(lambda p, x: conditioning.prepare(models, p, x)["context"])
  out = []
  for start in range(0, len(prompts), 32):
    chunk = {k: v[start: start + 32] for k, v in inputs.items()}
    pad = 32 - len(chunk["ids"])
    batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in chunk.items()}
    batch[TIME_IDS] = np.zeros((32, 6), np.float32)    # SDXL's micro-conditioning: unused here
    out.extend(np.asarray(encode(params, batch))[: 32 - pad])
  return [h[skip: n].astype(np.float64) for h, n, skip in zip(out, lengths, skips)]


def _read_run(path: Path):
  """A run folder (or a merged folder) -> (Result, base model path the run names)."""
  path = Path(path)
  result = cd.load_result(path)
  config = path / "config.json" if path.is_dir() else path.parent / "config.json"
  base = result.base_model
  if config.is_file():
    saved = json.loads(config.read_text())
    options = saved.get("method", {})
    if options.get("freeze_model", "crossattn_kv") != "crossattn_kv":
      raise ConfigError(f"{path}: trained with freeze_model={options['freeze_model']}; the "
                        "closed-form merge combines key/value matrices only (crossattn_kv runs)")
  extra = sorted(p for p in result.weights if not KV.fullmatch(p))
  if extra:
    raise ModelFileError(f"{result.path}: holds {extra[0]}; the closed-form merge combines only "
                         "attn2 to_k/to_v (train with freeze_model=crossattn_kv)")
  if not result.concepts:
    raise ModelFileError(f"{result.path}: records no concept (token and prompt) to merge")
  return result, base


def _target_phrase(concept: dict, source) -> str:
  token, prompt = concept["token"], concept.get("prompt", "")
  if token not in prompt:
    raise ModelFileError(f"{source}: concept {token} has no prompt containing it ({prompt!r}); the "
                         "merge needs its words, e.g. 'photo of a <new1> cat'")
  return prompt[prompt.index(token):].strip()


def merge_runs(runs: list, out, *, model=None, reg_captions: list[str] | None = None) -> dict:
  """Merges Custom Diffusion results (run folders) into `out` (a folder). Returns a summary:
  {"path", "concepts", "layers", "max_constraint_error"}."""
  from persona_jax.convert.files import write_json, write_safetensors
  from persona_jax.default_model import resolve_model
  from persona_jax.pipeline import load_pipeline
  if len(runs) < 2:
    raise ConfigError("merge needs at least two Custom Diffusion runs")
  read = [_read_run(Path(r)) for r in runs]
  bases = {b for _, b in read}
  if model is None:
    if len(bases) != 1:
      raise ConfigError(f"the runs were trained on different base models ({', '.join(sorted(bases))}); "
                        "pass --model to say which one to merge into")
    model = bases.pop()
  pipe = load_pipeline(resolve_model(model))
  base_flat = tree.flatten(pipe.params)
  for result, _ in read:               # a run of another base (family) is a one-line error
    result_file.check_fits(result.path, result.base_model, base_flat, result.weights)
    cd.check_rows(result, pipe.params)

  # Concepts with unique token names, in run order; the rows of every token in every encoder.
  concepts, rows, used = [], {key: [] for key in read[0][0].rows}, set()
  for k, (result, _) in enumerate(read):
    for i, concept in enumerate(result.concepts):
      phrase = _target_phrase(concept, result.path)
      token = concept["token"]
      if token in used:
        n = len(used) + 1
        while f"<new{n}>" in used:
          n += 1
        log.info("%s: token %s is taken by an earlier run; it is <new%d> in the merge",
                 result.path, token, n)
        phrase, token = phrase.replace(token, f"<new{n}>"), f"<new{n}>"
      used.add(token)
      concepts.append({"token": token, "prompt": PREFIX + phrase, "phrase": phrase, "run": k,
                       "source": str(runs[k])})
      for key, table in rows.items():
        table.append(result.rows[key][i])
  rows = {key: np.stack(table).astype(np.float32) for key, table in rows.items()}
  tokens = tuple(c["token"] for c in concepts)
  tokenizers = tokenizers_with_tokens(pipe.tokenizer_dirs, tokens)

  prefix_len = 1 + len(tokenizers[0](PREFIX.strip(), add_special_tokens=False)["input_ids"])
  captions = reg_captions or default_reg_captions()
  phrases = [p for c in concepts for p in (c["phrase"], PREFIX + c["phrase"])]
  feats = text_features(pipe, tokenizers, rows, captions + phrases,
                        [1] * len(captions) + [1, prefix_len] * len(concepts))
  reg = np.concatenate(feats[: len(captions)])                               # [n, in]
  if reg.shape[0] < reg.shape[1]:
    raise ConfigError(f"--reg-captions: {len(captions)} captions give {reg.shape[0]} text features "
                      f"for a text width of {reg.shape[1]}; give more captions (at least "
                      f"{reg.shape[1]} tokens in all) so the merge has one solution")
  targets = [(c["run"], np.concatenate(feats[len(captions) + 2 * i: len(captions) + 2 * i + 2]))
             for i, c in enumerate(concepts)]          # (run index, [s_i, in] features) per concept
  c_all = np.concatenate([f for _, f in targets])
  keep = _unique_rows(c_all)
  if len(keep) > c_all.shape[1]:
    raise ConfigError(f"{len(keep)} target features exceed the text width {c_all.shape[1]}: too "
                      "many concepts to satisfy exactly")

  layers = sorted(set().union(*(r.weights for r, _ in read)))
  merged, worst = {}, 0.0
  for path in layers:
    missing = [str(runs[k]) for k, (r, _) in enumerate(read) if path not in r.weights]
    if missing:
      raise ModelFileError(f"{missing[0]}: has no {path}; the runs must train the same layers")
    w0 = np.asarray(base_flat[path], np.float64).T                            # [out, in]
    v = np.concatenate([read[k][0].weights[path].T.astype(np.float64) @ f.T for k, f in targets],
                       axis=1)                                                # [out, s]
    w = constrained_merge(w0, c_all[keep], v[:, keep], reg)
    worst = max(worst, float(np.abs(w @ c_all[keep].T - v[:, keep]).max()
                             / max(np.abs(v[:, keep]).max(), 1e-12)))
    merged[path] = w.T.astype(np.float32)
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  meta = {"format": cd.FORMAT, "base_model": str(model),
          "concepts": json.dumps([{"token": c["token"], "prompt": c["prompt"]} for c in concepts]),
          "method": json.dumps({"modifier_tokens": list(tokens), "freeze_model": "crossattn_kv"})}
  path = out / cd.RESULT_FILE
  write_safetensors(path, {**merged, **rows}, meta)
  summary = {"path": str(path), "concepts": [{k: c[k] for k in ("token", "prompt", "source")}
                                             for c in concepts],
             "layers": len(merged), "max_constraint_error": worst, "base_model": str(model),
             "reg_captions": len(reg_captions or default_reg_captions())}
  write_json(out / "merge.json", summary)
  return summary


def _unique_rows(features: np.ndarray, rtol: float = 1e-5) -> list[int]:
  """Indices of the first occurrence of each distinct row (the paper drops repeated features;
  rows equal to float32 rounding count as repeats, as they would make the system singular)."""
  keep = []
  for i, row in enumerate(features):
    if not any(np.allclose(row, features[j], rtol=rtol, atol=rtol * np.abs(row).max())
               for j in keep):
      keep.append(i)
  return keep


# `persona-jax merge RUN_A RUN_B ... --out DIR` (registry.COMMANDS).


def add_arguments(p) -> None:
  p.add_argument("runs", nargs="+", type=Path,
                 help="workdirs of custom_diffusion runs (freeze_model=crossattn_kv), or merged folders")
  p.add_argument("--out", required=True, type=Path, help="output folder")
  p.add_argument("--model", default=None,
                 help="the base model (default: the one the runs were trained on)")
  p.add_argument("--reg-captions", type=Path, default=None,
                 help="regularization captions, one per line (default: 200 generic captions "
                      "shipped with persona_jax; the paper uses 200 LAION captions)")


def run(args) -> int:
  captions = None
  if args.reg_captions is not None:
    if not args.reg_captions.is_file():
      raise PersonaError(f"{args.reg_captions}: no such captions file (one caption per line)")
    captions = [l.strip() for l in args.reg_captions.read_text().splitlines() if l.strip()]
  summary = merge_runs(args.runs, args.out, model=args.model, reg_captions=captions)
  for c in summary["concepts"]:
    print(f"  {c['token']:<10} {c['prompt']!r}  from {c['source']}")
  print(f"{summary['layers']} key/value matrices merged; largest relative constraint error "
        f"{summary['max_constraint_error']:.1e}")
  print(summary["path"])
  return 0


COMMAND = Command("merge", "combine Custom Diffusion runs in closed form (Kumari et al. 2023)",
                  add_arguments, run)
