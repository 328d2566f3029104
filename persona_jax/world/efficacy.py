"""Our DreamBench on the toy world: does a method learn a subject, keep following prompts, and
leave the class alone? (`persona-jax eval --method NAME`.)

For each of K held-out subjects (a class with a look pre-training never showed), the method
trains on `references` rendered images of it through the ordinary `train` function, then
generates `seeds` images for each of three kinds of prompt:

  subject   "a photo of a PHRASE"                       (PHRASE: the method's words for the
  context   "a photo of a PHRASE on grass", ...           subject, e.g. "sks ball", "<sks>")
  class     "a photo of a ball on grass", ...           (the class without the identifier)

The world's metric encoder (never seen by any method) scores them:

  subject_similarity  mean cosine similarity of the metric encoder's features between subject
                      and context generations and the reference images (DINO / CLIP-I analog)
  subject_match       fraction of subject and context generations whose class, colour, pattern
                      and pattern colour are all the subject's
  prompt_fidelity     fraction of context generations showing the prompt's background (CLIP-T
                      analog: the subject in a new context)
  class_fidelity      fraction of class generations showing the prompt's class and background
  drift               fraction of class generations that show the subject's look: the class
                      collapsed onto the subject (what prior preservation prevents)

Context and class prompts use backgrounds the references never show. The rows "base" (the class
prompt alone) and "base_described" (the look said in words, e.g. "a photo of a red and white
striped ball") are the untrained references.

How a method runs is its registry entry's recipe (methods/spec.py `EvalRecipe`), by kind:
  tuned         train on the subject's references, then sample every prompt with the run;
  one_image     tune `steps` on the first reference from a pre-trained state (`state`, default
                the shipped one; E4T's is pre-trained on balls: use `subject_class="ball"`), and
                sample with that image;
  tuning_free   no training per subject: `state` is a run trained once on the world; the subject
                and context prompts sample with the references (one pass: encode + sample), the
                class prompts without them (the frozen base itself, so the drift of InstantBooth
                and IP-Adapter is 0 by construction; or the run without images: FastComposer's
                own UNet's text path).
Every run, trained here or given, samples through its method's `sample` (as `sample --run`).
A knob value (the recipe's `inputs`, `--face-embedding`, `--input NAME=VALUE`) may say
"{references}": the subject's reference folder, and "{cls}": its class. `paired_difference` of
two eval.json summaries is BENCHMARKS.md's "vs base (paired)". The identity benchmark (identity_efficacy.py, `--domain identities`) runs the same
pieces on held-out identities, judged by face analysis.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from persona_jax.errors import ConfigError
from persona_jax.world import identities, scenes

log = logging.getLogger(__name__)

UNTRAINED = ("base", "base_described")
# The worlds a benchmark runs on: the classes of each (`--subject-class`).
DOMAIN_CLASSES = {"scenes": scenes.CLASSES, "identities": identities.IDENTITY_CLASSES}
REFERENCES_PLACEHOLDER = "{references}"
CLASS_PLACEHOLDER = "{cls}"


def recipes() -> dict:
  """{eval name: (method spec, EvalRecipe)} of every registered method."""
  from persona_jax.methods.registry import eval_recipes
  return eval_recipes()


def method_names() -> tuple[str, ...]:
  return UNTRAINED + tuple(recipes())


def takes_state(recipe) -> bool:
  """Whether a recipe (None: an untrained row) starts from a run given as --state."""
  return recipe is not None and (recipe.kind == "tuning_free" or bool(recipe.state_key))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  method: str
  model: str = "default"
  subjects: int = 2
  seeds: int = 4                       # images per prompt
  references: int = 4
  contexts: int = 2                    # new backgrounds per subject
  steps: int | None = None             # training steps (default: the recipe's)
  lr: float | None = None              # learning rate (default: the recipe's; 0 = a control run)
  batch_size: int = 4
  class_images: int = 16
  sample_steps: int = 25
  guidance: float = 4.0
  seed: int = 0
  metric: str | None = None            # metric encoder folder (default: the shipped one)
  subject_class: str | None = None     # held-out subjects of this class only (default: all)
  state: str | None = None             # one_image, tuned with a state_key: the pre-trained state
                                       # (default: the recipe's); tuning-free: the method's trained
                                       # run (workdir or result file)
  inputs: tuple = ()                   # ((knob, value), ...): sampling knobs (ip_scale, beta, ...)
                                       # over the recipe's; "{references}" in a value: the
                                       # subject's reference folder, "{cls}": its class
  domain: str = "scenes"               # scenes (this module) | identities (identity_efficacy.py)

  def __post_init__(self):
    names = method_names()
    if self.method not in names:
      raise ConfigError(f"--method {self.method!r}: not one of {', '.join(names)}")
    if self.subjects < 1 or self.seeds < 1 or self.references < 1:
      raise ConfigError("--subjects, --seeds and --references must be at least 1")
    if self.domain not in DOMAIN_CLASSES:
      raise ConfigError(f"--domain {self.domain!r}: not one of {', '.join(DOMAIN_CLASSES)}")
    classes = DOMAIN_CLASSES[self.domain]
    if self.subject_class is not None and self.subject_class not in classes:
      raise ConfigError(f"--subject-class {self.subject_class!r}: not one of {', '.join(classes)}"
                        f"{'' if self.domain == 'scenes' else ' (the ' + self.domain + ' domain)'}")
    recipe = self.recipe
    if recipe and recipe.kind == "tuning_free" and not self.state:
      raise ConfigError(f"--method {self.method} personalizes with a run trained once on the "
                        "world: give --state WORKDIR (BENCHMARKS.md has the training commands)")
    if recipe and recipe.state_key and not (self.state or recipe.state_default):
      raise ConfigError(f"--method {self.method} tunes from a pre-trained run: give --state "
                        "WORKDIR (BENCHMARKS.md has the training commands)")
    if self.state and not takes_state(recipe):
      takers = sorted(n for n, (_, r) in recipes().items() if takes_state(r))
      raise ConfigError(f"--state is for {', '.join(takers)}, not {self.method}")

  @property
  def recipe(self):
    """The method's EvalRecipe (None for the untrained rows)."""
    return None if self.method in UNTRAINED else recipes()[self.method][1]

  @property
  def spec(self):
    return None if self.method in UNTRAINED else recipes()[self.method][0]


def eval_subjects(k: int, cls: str | None = None, pool=None, classes=None) -> list:
  """The first k subjects of a fixed order that cycles through the classes (or of class `cls`).
  `pool`, `classes`: other held-out subjects with a `cls` (default: the world's subjects,
  `scenes.CLASSES`; identity_efficacy.py: the held-out identities)."""
  pool = scenes.subjects() if pool is None else list(pool)
  rng = np.random.default_rng(1234)
  order = [pool[i] for i in rng.permutation(len(pool))]
  classes = (scenes.CLASSES if classes is None else tuple(classes)) if cls is None else (cls,)
  by_class = {c: [s for s in order if s.cls == c] for c in classes}
  if k > sum(len(v) for v in by_class.values()):
    raise ConfigError(f"--subjects {k}: the world holds out {sum(len(v) for v in by_class.values())}"
                      f" subjects{'' if cls is None else ' of class ' + cls}")
  rounds = [[by_class[c][r] for c in classes if r < len(by_class[c])]     # a class runs out:
            for r in range(max(len(v) for v in by_class.values()))]        # the others go on
  return [s for r in rounds for s in r][:k]


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
  text: str
  kind: str                 # subject | context | class
  background: str | None    # the background the prompt asks for


def prompts_for(subject, phrase: str, contexts: int, new_backgrounds=None) -> list[EvalPrompt]:
  """The subject, context and class prompts of one subject (with a `cls`), on `new_backgrounds`
  (default: the backgrounds `scenes.subject_scenes` references lack, but the subject's colours)."""
  if new_backgrounds is None:
    seen = set(scenes.reference_backgrounds())
    new_backgrounds = [b for b in scenes.BACKGROUNDS if b not in seen
                       and b not in (subject.look.colour, subject.look.pattern_colour)]
  new = list(new_backgrounds)
  if contexts and not new:
    raise ConfigError(f"{subject.words}: no background is left that its references do not show; "
                      "give fewer --references")
  rng = np.random.default_rng(scenes._stable_hash(repr(subject)) & 0xFFFFFFFF)
  backgrounds = [str(b) for b in rng.choice(new, size=min(contexts, len(new)), replace=False)]
  out = [EvalPrompt(f"a photo of a {phrase}", "subject", None)]
  out += [EvalPrompt(f"a photo of a {phrase} {scenes.background_phrase(b)}", "context", b)
          for b in backgrounds]
  out += [EvalPrompt(f"a photo of a {subject.cls} {scenes.background_phrase(b)}", "class", b)
          for b in backgrounds]
  return out


def subject_phrase(cfg: "EvalConfig", subject: scenes.Subject) -> str:
  """The words for the subject in prompts: the class (base), the look in words (base_described)
  or the method's phrase."""
  if cfg.method == "base":
    return subject.cls
  if cfg.method == "base_described":
    return subject.words
  return cfg.recipe.phrase.format(cls=subject.cls)


def write_references(subject: scenes.Subject, folder: Path, n: int) -> np.ndarray:
  """Renders n reference images of a subject into `folder` (`save_references`); returns them,
  uint8 [n, 32, 32, 3]."""
  scene_list = scenes.subject_scenes(subject, n)
  images = np.stack([scenes.render(scene) for scene in scene_list])
  save_references(images, [scenes.coverage(scene) for scene in scene_list], folder)
  return images


def save_references(images: np.ndarray, coverages, folder: Path, extra=None) -> None:
  """Writes reference images uint8 [n, H, W, 3] into `folder` as PNGs (the method's instance
  folder) and, into `folder`/segmented, each with its background replaced by noise, cropped to
  the object of its coverage [H, W] (FastComposer's subject images); `extra`: {file name:
  array} saved beside them as .npy."""
  from PIL import Image

  from persona_jax.data.fastcomposer import subject_crop
  from persona_jax.distributed import is_main, sync
  folder = Path(folder)
  if is_main():                   # with several processes the first writes, the others wait
    (folder / "segmented").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, (image, coverage) in enumerate(zip(images, coverages)):
      Image.fromarray(image).save(folder / f"{k:03d}.png")
      Image.fromarray(subject_crop(image, coverage, rng)).save(
          folder / "segmented" / f"{k:03d}.png")
    for name, array in (extra or {}).items():
      np.save(folder / name, array)
  sync("references written")


def knob_values(cfg: "EvalConfig") -> tuple:
  """The sampling knobs of a run: the recipe's, then --input's (a name given twice: the last)."""
  recipe_inputs = cfg.recipe.inputs if cfg.recipe else ()
  return tuple(dict(tuple(recipe_inputs) + tuple(cfg.inputs)).items())


def subject_inputs(inputs: tuple, folder: Path, cls: str | None = None) -> tuple:
  """The sampling knobs of one subject: REFERENCES_PLACEHOLDER in a str or path value becomes its
  reference folder (e.g. face_embedding={references}/face_embeddings.npy), CLASS_PLACEHOLDER its
  class `cls` (e.g. subject_class={cls})."""
  out = []
  for name, value in inputs:
    if isinstance(value, (str, Path)):
      text = str(value).replace(REFERENCES_PLACEHOLDER, str(folder))
      if cls is not None:
        text = text.replace(CLASS_PLACEHOLDER, cls)
      value = type(value)(text) if text != str(value) else value
    out.append((name, value))
  return tuple(out)


def score(metric, images: np.ndarray, prompts: list[EvalPrompt], seeds: int,
          subject: scenes.Subject, references: np.ndarray) -> dict[str, float]:
  """The five numbers of one subject. images [len(prompts) * seeds, 32, 32, 3] uint8 in
  prompt-major order; references uint8 [R, 32, 32, 3]. `metric` is (config, params)."""
  from persona_jax.world import metric_encoder as me
  feats, pred = me.predict(*metric, images)
  ref_feats, _ = me.predict(*metric, references)
  kinds = np.repeat([p.kind for p in prompts], seeds)
  backgrounds = np.repeat([p.background or "" for p in prompts], seeds)
  names = lambda k: np.asarray(scenes.ATTRIBUTES[k])[pred[k]]
  look = scenes.look_attributes(subject.look)
  is_look = np.all([names(k) == v for k, v in look.items()], axis=0)
  is_class = names("class") == subject.cls
  on_background = names("background") == backgrounds
  personal = kinds != "class"
  similarity = feats[personal] @ ref_feats.T
  return {
      "subject_similarity": float(similarity.mean()),
      "subject_match": float(np.mean((is_look & is_class)[personal])),
      "prompt_fidelity": float(np.mean(on_background[kinds == "context"])),
      "class_fidelity": float(np.mean((is_class & on_background)[kinds == "class"])),
      "drift": float(np.mean(is_look[kinds == "class"])),
  }


def recipe_config(cfg: EvalConfig, subject: scenes.Subject, instance_dir: Path, class_dir: Path):
  """The `train` config (ConfigDict) of the method's run on one subject: its recipe over the
  method's :tiny config."""
  from ml_collections import ConfigDict

  from persona_jax.train.config import load_config
  recipe = cfg.recipe
  c: ConfigDict = load_config(recipe.config if ":" in recipe.config else f"{recipe.config}:tiny")
  steps = recipe.steps if cfg.steps is None else cfg.steps
  values = {"model": cfg.model, "data.instance_dir": str(instance_dir), "data.resolution": 32,
            "data.random_flip": 0.0, "steps": steps, "batch_size": cfg.batch_size,
            "optim.lr": recipe.lr if cfg.lr is None else cfg.lr, "optim.scale_lr": False,
            "seed": cfg.seed, "log_every": max(1, min(25, steps)), "checkpoint_every": steps,
            "keep_checkpoints": 1, "sample_every": 0, "sample_prompts": (),
            "mixed_precision": "no"}
  for key, value in recipe.options:
    values[key] = value.format(cls=subject.cls) if isinstance(value, str) else value
  if recipe.state_key:
    values[recipe.state_key] = state_value(cfg)
  if not recipe.prior:
    values["data.num_class_images"] = 0     # dreambooth:tiny's class images, when they are off
  else:
    values.update({"data.class_prompt": f"a photo of a {subject.cls}",
                   "data.class_dir": str(class_dir), "data.num_class_images": cfg.class_images,
                   "data.class_sample_steps": cfg.sample_steps, "data.class_guidance": cfg.guidance})
  for key, value in values.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def state_value(cfg: EvalConfig) -> str:
  """What the recipe's state_key gets: --state (with state_result, the run's result in it when
  there is one) or the recipe's default."""
  if not cfg.state:
    return cfg.recipe.state_default
  result = Path(cfg.state) / cfg.spec.result.file
  return str(result) if cfg.recipe.state_result and result.exists() else cfg.state


def run_sampling(spec, result, pipe, images, inputs):
  """The Sampling of a loaded run (its method's `sample`, as `sample --run` does)."""
  from persona_jax.methods.spec import SampleRequest
  return spec.sample(SampleRequest(result, pipe, pipe.params, tuple(images), dict(inputs)))


def _train(cfg: EvalConfig, subject: scenes.Subject, instance_dir: Path, workdir: Path,
           class_dir: Path):
  """Trains the method on one subject; returns (pipeline, Sampling, seconds)."""
  from persona_jax.train.config import run_config
  from persona_jax.train.loop import train
  c = recipe_config(cfg, subject, instance_dir, class_dir)
  start = time.perf_counter()
  summary = train(run_config(c), workdir, progress=False)
  seconds = time.perf_counter() - start
  from persona_jax.methods.registry import find_run
  pipe = summary["run"].base_pipeline()
  spec, result = find_run(workdir, cfg.spec.name)
  base = spec.base_model(result)
  if base and Path(base) != Path(pipe.path or ""):       # a result that is its own model
    from persona_jax.methods.registry import load_model
    pipe = load_model(base)
  images = [instance_dir / "000.png"] if cfg.recipe.kind == "one_image" else []
  return pipe, run_sampling(spec, result, pipe, images, cfg.inputs), seconds


def tuning_free_sampling(cfg: EvalConfig, pipe, references: list[Path], segmented: list[Path]):
  """A tuning-free method's (pipeline, Sampling with the subject's images for the subject and
  context prompts, Sampling without them for the class prompts: None for the base itself). The
  pipeline is `pipe` (the base) unless the run's recorded base is a pipeline folder a method owns
  (a BLIP-Diffusion run's result is its own model)."""
  from persona_jax.methods.registry import find_run, load_model, pipeline_owner
  spec, result = find_run(cfg.state, cfg.spec.name)
  base = spec.base_model(result)
  if base and Path(base) != Path(pipe.path or "") and pipeline_owner(base) is not None:
    pipe = load_model(base)
  images = {"segmented": segmented[:1], "first": references[:1]}.get(cfg.recipe.subject_images,
                                                                     references)
  personal = run_sampling(spec, result, pipe, images, cfg.inputs)
  plain = (run_sampling(spec, result, pipe, [], cfg.inputs)
           if cfg.recipe.class_prompts == "run" else None)
  return pipe, personal, plain


def generate(cfg: EvalConfig, subject, prompts: list[EvalPrompt], refs_dir: Path, workdir: Path,
             class_dir: Path, base_pipe, progress: bool = True):
  """The method's images of one subject's prompts: (uint8 [len(prompts) * seeds, 32, 32, 3] in
  prompt-major order, train seconds, sample seconds). refs_dir holds its references (000.png, ...,
  segmented/); a tuned method's run goes to `workdir`, class images to `class_dir`; `base_pipe()`:
  the base pipeline (loaded once by the caller)."""
  from persona_jax.text_to_image import SampleOptions, text_to_image
  options = SampleOptions(steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed,
                          height=32, width=32, batch_size=16)
  cfg = dataclasses.replace(cfg, inputs=subject_inputs(knob_values(cfg), refs_dir, subject.cls))
  train_seconds = 0.0
  start = time.perf_counter()
  kind = cfg.recipe.kind if cfg.recipe else None
  if kind in (None, "tuning_free"):
    pipe = plain_pipe = base_pipe()
    personal = plain = None
    if kind == "tuning_free":
      files = [refs_dir / f"{k:03d}.png" for k in range(cfg.references)]
      pipe, personal, plain = tuning_free_sampling(
          cfg, pipe, files, [refs_dir / "segmented" / f.name for f in files])
      if plain is not None:                 # the run without images: on the run's pipeline
        plain_pipe = pipe
  else:
    pipe, personal, train_seconds = _train(cfg, subject, refs_dir, workdir, class_dir)
    plain, plain_pipe = personal, pipe
    start = time.perf_counter()
  split = sum(p.kind != "class" for p in prompts)       # prompts_for puts the class ones last
  groups = ([(prompts, pipe, personal)] if plain is personal and plain_pipe is pipe
            else [(prompts[:split], pipe, personal), (prompts[split:], plain_pipe, plain)])
  images = []               # image k keeps the noise of its place in the whole prompt list
  for group, group_pipe, sampling in groups:
    images.append(text_to_image(group_pipe, [p.text for p in group], "", cfg.seeds, options,
                                start_index=sum(len(x) for x in images), progress=progress,
                                sampling=sampling))
  return np.concatenate(images), train_seconds, time.perf_counter() - start


def base_loader(model: str):
  """A zero-argument function that loads the base model `model` on its first call."""
  import functools

  @functools.cache
  def load():
    from persona_jax.default_model import resolve_model
    from persona_jax.pipeline import load_pipeline
    return load_pipeline(resolve_model(model))
  return load


def summarize(cfg: EvalConfig, rows: list[dict], keys, **extra) -> dict:
  """An eval.json summary: the method, config and steps, the mean of each of `keys` over the
  subject rows (None when a row has none), mean wall times, `extra` and the rows."""
  means = {}
  for k in keys:
    values = [r[k] for r in rows]
    means[k] = None if any(v is None for v in values) else float(np.mean(values))
  return {"method": cfg.method, **extra, "config": dataclasses.asdict(cfg),
          "steps": (0 if cfg.recipe is None or cfg.recipe.kind == "tuning_free"
                    else cfg.steps or cfg.recipe.steps),
          **means,
          "train_seconds": float(np.mean([r["train_seconds"] for r in rows])),
          "sample_seconds": float(np.mean([r["sample_seconds"] for r in rows])),
          "subjects": rows}


def write_summary(summary: dict, out: Path) -> None:
  """OUT/eval.json (written whole, then moved into place)."""
  tmp = Path(out) / ".eval.json.tmp"
  tmp.write_text(json.dumps(summary, indent=2, default=str))     # knob values may be paths
  tmp.replace(Path(out) / "eval.json")


def evaluate(cfg: EvalConfig, out: Path, progress: bool = True) -> dict:
  """Runs the evaluation; writes OUT/eval.json and a sample grid per subject; returns the
  summary (mean metrics over subjects, per-subject rows, wall times)."""
  from persona_jax.distributed import is_main
  from persona_jax.images import grid, save_png
  from persona_jax.world import metric_encoder as me
  if cfg.domain != "scenes":
    raise ConfigError(f"efficacy.evaluate runs the scenes domain, not {cfg.domain!r} "
                      "(identity_efficacy.evaluate)")
  out = Path(out)
  main = is_main()                # with several processes every one computes, the first writes
  if main:
    out.mkdir(parents=True, exist_ok=True)
  metric = me.load(cfg.metric)
  base = base_loader(cfg.model)
  rows = []
  for subject in eval_subjects(cfg.subjects, cfg.subject_class):
    name = subject.words.replace(" ", "_")
    refs_dir = out / "references" / name
    references = write_references(subject, refs_dir, cfg.references)
    prompts = prompts_for(subject, subject_phrase(cfg, subject), cfg.contexts)
    images, train_seconds, sample_seconds = generate(
        cfg, subject, prompts, refs_dir, out / "runs" / name, out / "class_images" / subject.cls,
        base, progress)
    if main:
      save_png(grid(images, cols=cfg.seeds), out / "samples" / f"{name}.png")
    row = {"subject": subject.words, **score(metric, images, prompts, cfg.seeds, subject, references),
           "train_seconds": round(train_seconds, 1), "sample_seconds": round(sample_seconds, 1),
           "prompts": [p.text for p in prompts]}
    log.info("%s on %s: %s", cfg.method, subject.words,
             ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
    rows.append(row)
  summary = summarize(cfg, rows, ("subject_similarity", "subject_match", "prompt_fidelity",
                                   "class_fidelity", "drift"))
  if main:
    write_summary(summary, out)
  return summary


def paired_difference(summary: dict, base: dict, key: str) -> tuple[float, float, int]:
  """(mean, standard error, n) of the per-subject differences summary - base of metric `key`
  over the subjects both eval.json summaries hold (BENCHMARKS.md's "vs base (paired)"); the
  standard error is the differences' sample standard deviation / sqrt(n) (0 for one subject)."""
  theirs = {r["subject"]: r[key] for r in base["subjects"]}
  shared = [r for r in summary["subjects"] if r["subject"] in theirs]
  if not shared:
    raise ConfigError(f"the base run ({base.get('method')}) shares no subject with "
                      f"{summary.get('method')}: run both with the same --subjects and --domain")
  d = np.asarray([r[key] - theirs[r["subject"]] for r in shared], np.float64)
  se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
  return float(d.mean()), se, len(d)


def read_summary(path) -> dict:
  """An eval.json (or the folder holding one), checked to be a summary with per-subject rows."""
  path = Path(path)
  path = path / "eval.json" if path.is_dir() else path
  try:
    summary = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise ConfigError(f"{path}: no such file; give an eval OUT folder or its eval.json") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not a readable eval.json ({e})") from None
  if not isinstance(summary, dict) or not isinstance(summary.get("subjects"), list):
    raise ConfigError(f"{path}: not an eval.json (no per-subject \"subjects\" rows)")
  return summary


def table_row(summary: dict) -> str:
  """One markdown row: method, steps, train and sample seconds per subject, the five numbers."""
  return (f"| {summary['method']} | {summary['steps']} | {summary['train_seconds']:.0f} | "
          f"{summary.get('sample_seconds', float('nan')):.0f} | "
          f"{summary['subject_similarity']:.3f} | {summary['subject_match']:.2f} | "
          f"{summary['prompt_fidelity']:.2f} | {summary['class_fidelity']:.2f} | "
          f"{summary['drift']:.2f} |")


TABLE_HEADER = ("| method | steps | train s / subject | sample s / subject | subject similarity | "
                "subject match | prompt fidelity | class fidelity | drift |\n"
                "|---|---|---|---|---|---|---|---|---|")
