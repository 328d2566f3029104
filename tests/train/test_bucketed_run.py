"""A bucketed LoRA run with prior preservation through the CLI over images of mixed aspect ratios:
one compiled step per bucket, and a run stopped after a checkpoint resumes bitwise (slow: the same
on the tiny SDXL model, whose UNet reads the buckets' time ids)."""

import json
import logging
import re

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from persona_jax import tree
from persona_jax.cli import main
from persona_jax.data import buckets as B
from persona_jax.train import checkpoint as ckpt
from persona_jax.train import loop
from tests.markers import slow
from tests.runs import lora_config, one_device_mesh, write_class_images, write_config_file
from tests.train.test_loop import _final_state

# (H, W): 3:2, 2:3, an odd size; at resolution 32 with 8-pixel steps they fall in the buckets
# 40x24 and 24x40 (both of the last two); the SDXL run adds a square one (32x32).
SIZES = {"wide": (32, 48), "tall": (48, 32), "odd": (53, 37)}
SDXL_SIZES = {"square": (32, 32), **SIZES}
STEPS, STOP_AFTER, BATCH = 4, 2, 1


class Stopped(Exception):
  """Stands for a kill right after a checkpoint."""


@pytest.fixture(params=[False, pytest.param(True, marks=slow)], ids=["compiles", "resumes"])
def resume(request):
  return request.param


def test_bucketed_run_compiles_once_per_bucket_and_resumes_bitwise(model_dirs, tmp_path,
                                                                   monkeypatch, caplog, resume):
  """The run compiles once per bucket; slow ("resumes"): stopped after a checkpoint, the same
  command resumes and ends bitwise equal to the uninterrupted run."""
  rng = np.random.default_rng(0)
  inst = tmp_path / "inst"
  inst.mkdir()
  for name, (h, w) in SIZES.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(inst / f"{name}.png")
  classes = write_class_images(tmp_path / "classes", n=2, size=40)
  # Batch 1 + 1 class row on one device (the 8 test devices' sharded programs compile several
  # times slower). LoRA on the UNet, text contexts and VAE moments cached (per bucket).
  mesh = one_device_mesh()
  monkeypatch.setattr(loop.mesh_lib, "make_mesh", lambda *a, **k: mesh)
  values = lora_config(
      model_dirs["sd1"], steps=STEPS, batch_size=BATCH, checkpoint_every=STOP_AFTER,
      data=dict(instance_dir=str(inst), buckets=True, bucket_step=8, num_class_images=2,
                class_dir=str(classes), class_prompt="a photo of toy",
                class_generate=False)).to_dict()
  config_file = write_config_file(tmp_path / "bucketed.py", values)
  traces = []
  real_step = loop.train_step

  def counted(*args, **kwargs):          # runs once per trace: once per new batch shape
    traces.append(args[2]["time_ids"].shape)
    return real_step(*args, **kwargs)
  monkeypatch.setattr(loop, "train_step", counted)

  def train(workdir):
    traces.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="persona_jax"):
      code = main(["train", "--config", str(config_file), "--workdir", str(workdir),
                   "--noprogress"])
    compiled = re.findall(r"compiling the step for bucket (\d+x\d+)", caplog.text)
    return code, compiled

  # The buckets of the steps, from the plan (buckets sorted: 24x40 has 2 images, 40x24 one).
  plan = B.BucketPlan((2, 1), BATCH, values["seed"])
  names = ["24x40", "40x24"]
  bucket_of = [names[plan.batch(k)[0]] for k in range(STEPS)]

  code, compiled = train(tmp_path / "a")
  assert code == 0
  assert "buckets: 2 of 9 used (24x40: 2 image(s), 40x24: 1 image(s))" in caplog.text
  assert sorted(compiled) == names and len(traces) == 2          # once per bucket
  assert compiled == list(dict.fromkeys(bucket_of))

  if not resume:
    return
  # Stopped after the step-2 checkpoint, then the same command resumes.
  real_save = ckpt.save

  def save_then_stop(manager, step, *args):
    real_save(manager, step, *args)
    if step == STOP_AFTER:
      manager.wait_until_finished()
      raise Stopped
  monkeypatch.setattr(ckpt, "save", save_then_stop)
  with pytest.raises(Stopped):
    train(tmp_path / "b")
  assert ckpt.finished_steps(tmp_path / "b") == [STOP_AFTER]
  monkeypatch.setattr(ckpt, "save", real_save)
  code, compiled = train(tmp_path / "b")
  assert code == 0 and "resuming" in caplog.text
  assert compiled == list(dict.fromkeys(bucket_of[STOP_AFTER:])) and len(traces) == len(compiled)

  a, b = _final_state(tmp_path / "a", STEPS), _final_state(tmp_path / "b", STEPS)
  assert a.keys() == b.keys() and any("lora" in k for k in a)
  for k in a:
    assert np.array_equal(a[k], b[k]), k
  la, lb = (load_file(tmp_path / w / "lora.safetensors") for w in "ab")
  assert la.keys() == lb.keys() and all(np.array_equal(la[k], lb[k]) for k in la)
  lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in lines]
  assert steps == [1, 2, 3, 4]


@slow                    # three SDXL step compiles; the SD 1.x run above covers the same code
def test_bucketed_sdxl_run_feeds_each_buckets_time_ids(sdxl_dir, tmp_path):
  """A bucketed SDXL LoRA run with class rows: every step's batch is one bucket, its time ids
  the bucket's (what the UNet's added conditioning reads), one trace per bucket, and it trains."""
  rng = np.random.default_rng(1)
  inst = tmp_path / "inst"
  inst.mkdir()
  for name, (h, w) in SDXL_SIZES.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(inst / f"{name}.png")
  config = lora_config(
      sdxl_dir, steps=4, batch_size=1,          # epoch 0: 4 batches, every bucket
      data=dict(instance_dir=str(inst), buckets=True, bucket_step=8, num_class_images=2,
                class_dir=str(write_class_images(tmp_path / "classes", n=2, size=40)),
                class_prompt="a photo of toy", class_generate=False))
  result = loop.train(config, tmp_path / "run", progress=False, mesh=one_device_mesh())
  run = result["run"]
  assert result["batch_shapes"] == 3
  for k in range(4):
    batch = run.dataset[k]
    h, w = batch["time_ids"][0, 4:].astype(int)
    assert (w, h) in [(24, 40), (32, 32), (40, 24)]
    assert batch["latent_mean"].shape[1:3] == (h // run.pipe.vae_scale_factor,
                                               w // run.pipe.vae_scale_factor)
    np.testing.assert_array_equal(batch["time_ids"][:, 4:], [[h, w]] * 2)
  trained = tree.flatten(jax.device_get(result["state"].trainable))
  ups = [v for p, v in trained.items() if p.endswith("/b")]        # zero at step 0
  assert ups and any(np.any(v != 0) for v in ups)
