"""Remakes the toy world's identity encoder (ArcFace's stand-in): renders the training pool,
trains with the ArcFace loss, picks the threshold on training identities, measures held-out
verification and writes the folder (default: the shipped persona_jax/assets/toy_identity_encoder/).

  python scripts/make_toy_identity_encoder.py [--steps 2000] [--out DIR] [--workdir runs/...]

A rerun with the same --workdir resumes from its checkpoint.
"""

import argparse
import json
import time

from persona_jax.face.recognition import shipped_toy_dir
from persona_jax.world import toy_identity_encoder


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=toy_identity_encoder.TrainConfig.steps)
  parser.add_argument("--out", default=str(shipped_dir := shipped_toy_dir()),
                      help=f"folder to write (default {shipped_dir})")
  parser.add_argument("--workdir", default="runs/toy_identity_encoder",
                      help="checkpoint and metrics.jsonl (the loss curve)")
  parser.add_argument("--plot", default="docs/toy_world/identity_encoder_loss.png",
                      help="the loss curve PNG ('' for none)")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  facts = toy_identity_encoder.make(args.out, steps=args.steps, workdir=args.workdir,
                                    plot=args.plot or None)
  print(json.dumps(facts["verification"], indent=2))
  print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
