"""The identity benchmark on the toy world's identity domain: does a method keep who someone is,
and still follow prompts? (`persona-jax eval --domain identities --method NAME`.)

The scenes benchmark (world/efficacy.py) on identities (world/identities.py): for each of K
held-out identities (a fixed order cycling through `identities.IDENTITY_CLASSES`), R reference
scenes of it (`identity_scene(0, "held_out", m, who=...)`, any size, pose and background),
rendered 32x32 into OUT/references/NAME/ with `face_embeddings.npy` [R, 512] (the shipped toy
identity encoder on the true keypoints: PhotoMaker v2's `--face-embedding`). The method runs as
efficacy.py runs it (its EvalRecipe, the same three kinds of prompt: subject, context, class);
context and class prompts ask for plain-colour backgrounds the references do not show and that
are none of the identity's colours.

The judge is a face analysis (default `face.analysis.load_face_analysis("toy")`: a toy detector
and the toy recognizer, never seen by any method as a judge): it detects the faces of each
generation and embeds the first (highest detection score). Per subject:

  identity_similarity  mean cosine between the judge's embedding of each subject and context
                       generation and the mean of the references' unit embeddings (the judge's
                       recognizer on the references' true keypoints); a generation with no
                       detected face scores 0
  identity_match       fraction of those above the recognizer's threshold (None without one)
  face_rate            fraction of those in which the judge found a face
  identity_drift       fraction of class generations above the threshold: the class collapsed
                       onto the person
  subject_similarity, subject_match, prompt_fidelity, class_fidelity, drift: efficacy.py's
                       `score` with the metric encoder (look, background and class; it never
                       sees the mark or proportions that tell look-alike identities apart)

Rows: "base" (the class word), "base_described" (the look in words, e.g. "red ball") and every
method with an EvalRecipe. `paired_difference` (efficacy.py) gives a row's "vs base (paired)".
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from persona_jax.errors import ConfigError
from persona_jax.world import efficacy as ef
from persona_jax.world import identities, scenes
from persona_jax.world.identities import Identity

log = logging.getLogger(__name__)

REFERENCE_SEED = 0
EMBEDDINGS_FILE = "face_embeddings.npy"
JUDGE = "toy"
KEYS = ("identity_similarity", "identity_match", "face_rate", "identity_drift",
        "subject_similarity", "subject_match", "prompt_fidelity", "class_fidelity", "drift")


def eval_identities(k: int, cls: str | None = None) -> list[Identity]:
  """The first k held-out identities of a fixed order cycling through the identity classes (or
  of class `cls`)."""
  return ef.eval_subjects(k, cls, pool=identities.held_out_identities(),
                          classes=identities.IDENTITY_CLASSES)


def subject_name(who: Identity) -> str:
  """The folder and row name of an identity: its index and words ("1007_red_ball"; two held-out
  identities may share class and look)."""
  return f"{who.index}_{who.words.replace(' ', '_')}"


def reference_scenes(who: Identity, n: int) -> list:
  return [identities.identity_scene(REFERENCE_SEED, "held_out", m, who=who) for m in range(n)]


def new_backgrounds(who: Identity, scene_list) -> list[str]:
  """Plain-colour backgrounds that no reference shows and that are none of the identity's
  colours (look, pattern, mark)."""
  seen = {s.background for s in scene_list}
  own = (who.look.colour, who.look.pattern_colour, who.mark_colour)
  return [b for b in scenes.BG_COLOURS if b not in seen and b not in own]


def true_keypoints(scene_list) -> np.ndarray:
  """float32 [n, 5, 2]: each reference's keypoints in `face.align`'s convention."""
  from persona_jax.world.toy_identity_encoder import face_keypoints
  return np.stack([face_keypoints(s)[0] for s in scene_list])


def write_identity_references(who: Identity, folder: Path, n: int):
  """Renders n reference scenes of an identity into `folder` (efficacy.save_references, with
  face_embeddings.npy [n, 512]: the shipped toy recognizer on the true keypoints); returns
  (images uint8 [n, 32, 32, 3], scenes)."""
  from persona_jax.face.recognition import shipped_toy_recognizer
  scene_list = reference_scenes(who, n)
  images = np.stack([identities.render(s) for s in scene_list])
  rec = shipped_toy_recognizer()
  embeddings = np.concatenate([rec.embed_faces(image, points[None])
                               for image, points in zip(images, true_keypoints(scene_list))])
  ef.save_references(images, [identities.masks(s)[0] for s in scene_list], folder,
                     extra={EMBEDDINGS_FILE: embeddings.astype(np.float32)})
  return images, scene_list


def load_judge(name: str = JUDGE):
  """The face analysis that judges identity (`face.analysis.load_face_analysis`)."""
  from persona_jax.face.analysis import load_face_analysis
  from persona_jax.world import toy_face_detector
  toy_face_detector.register()
  return load_face_analysis(name)


def reference_centre(judge, references: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
  """[D]: the mean of the references' unit embeddings by the judge's recognizer on their true
  keypoints [n, 5, 2]."""
  e = np.concatenate([judge.recognizer.embed_faces(image, points[None])
                      for image, points in zip(references, keypoints)])
  return (e / np.linalg.norm(e, axis=-1, keepdims=True)).mean(0)


def judge_cosines(judge, images: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(cosines [N], found [N] bool): each image's first detected face's embedding against
  `centre`; 0 where no face is found."""
  from persona_jax.face.recognizer import cosine
  cos, found = np.zeros(len(images), np.float32), np.zeros(len(images), bool)
  for i, image in enumerate(images):
    faces = judge.analyze(np.asarray(image))
    if faces:
      found[i] = True
      cos[i] = float(cosine(faces[0].embedding, centre[None])[0])
  return cos, found


def identity_scores(judge, images: np.ndarray, prompts, seeds: int, centre: np.ndarray) -> dict:
  """identity_similarity, identity_match, face_rate, identity_drift of one subject (module
  docstring); images [len(prompts) * seeds, H, W, 3] uint8 in prompt-major order."""
  kinds = np.repeat([p.kind for p in prompts], seeds)
  cos, found = judge_cosines(judge, images, centre)
  personal, plain = kinds != "class", kinds == "class"
  threshold = judge.recognizer.threshold
  match = None if threshold is None else cos > threshold
  return {
      "identity_similarity": float(cos[personal].mean()),
      "identity_match": None if match is None else float(match[personal].mean()),
      "face_rate": float(found[personal].mean()),
      "identity_drift": (None if match is None or not plain.any()
                         else float(match[plain].mean())),
  }


def evaluate(cfg: ef.EvalConfig, out: Path, judge=None, progress: bool = True) -> dict:
  """Runs the identity benchmark; writes OUT/eval.json and a sample grid per identity; returns
  the summary (mean metrics over identities, per-identity rows, wall times). `judge`: a
  FaceAnalysis (default `load_judge()`)."""
  from persona_jax.distributed import is_main
  from persona_jax.images import grid, save_png
  from persona_jax.world import metric_encoder as me
  if cfg.domain != "identities":
    raise ConfigError(f"identity_efficacy.evaluate runs the identities domain, not {cfg.domain!r}")
  out = Path(out)
  main = is_main()
  if main:
    out.mkdir(parents=True, exist_ok=True)
  judge = load_judge() if judge is None else judge
  metric = me.load(cfg.metric)
  base = ef.base_loader(cfg.model)
  rows = []
  for who in eval_identities(cfg.subjects, cfg.subject_class):
    name = subject_name(who)
    refs_dir = out / "references" / name
    references, scene_list = write_identity_references(who, refs_dir, cfg.references)
    prompts = ef.prompts_for(who, ef.subject_phrase(cfg, who), cfg.contexts,
                             new_backgrounds(who, scene_list))
    images, train_seconds, sample_seconds = ef.generate(
        cfg, who, prompts, refs_dir, out / "runs" / name, out / "class_images" / who.cls, base,
        progress)
    if main:
      save_png(grid(images, cols=cfg.seeds), out / "samples" / f"{name}.png")
    centre = reference_centre(judge, references, true_keypoints(scene_list))
    row = {"subject": name, "identity": who.index,
           **identity_scores(judge, images, prompts, cfg.seeds, centre),
           **ef.score(metric, images, prompts, cfg.seeds, who, references),
           "train_seconds": round(train_seconds, 1), "sample_seconds": round(sample_seconds, 1),
           "prompts": [p.text for p in prompts]}
    log.info("%s on %s: %s", cfg.method, name,
             ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
    rows.append(row)
  summary = ef.summarize(cfg, rows, KEYS, domain="identities")
  if main:
    ef.write_summary(summary, out)
  return summary


def _number(value, digits: int) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def table_row(summary: dict, base: dict | None = None) -> str:
  """One markdown row of TABLE_HEADER; `base`: the base row's eval.json summary for the paired
  difference of identity similarity (mean +- standard error over the shared identities)."""
  vs = "-"
  if base is not None and base is not summary:
    mean, se, _ = ef.paired_difference(summary, base, "identity_similarity")
    vs = f"{mean:+.3f} +- {se:.3f}"
  s = summary
  cells = [s["method"], s["steps"], f"{s['train_seconds']:.0f}", f"{s['sample_seconds']:.0f}",
           _number(s["identity_similarity"], 3), vs]
  cells += [_number(s[k], 2) for k in ("identity_match", "face_rate", "prompt_fidelity",
                                       "class_fidelity", "drift", "identity_drift")]
  return "| " + " | ".join(map(str, cells)) + " |"


COLUMNS = ("method", "steps", "train s / identity", "sample s / identity", "identity similarity",
           "vs base (paired)", "identity match", "face rate", "prompt fidelity", "class fidelity",
           "drift", "identity drift")
TABLE_HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
