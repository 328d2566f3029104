"""End to end on the toy world: DreamBooth on a held-out subject (a look the base never saw) must
make the base draw that subject. The control runs share the prompts' seeds: the base model with
the class word, and DreamBooth at learning rate 0 with the identifier. A harness that scored the
references, a train step that did not update, or a sampler that ignored the trained params
would all fail it.
"""

from persona_jax.default_model import is_toy_base_shipped
from persona_jax.world import efficacy as ef

STEPS = 100
SEEDS = 6


def evaluate(tmp_path, method, **kwargs):
  # Batch 8: the tests' 8 simulated devices split every batch.
  cfg = ef.EvalConfig(method, subjects=1, seeds=SEEDS, contexts=1, batch_size=8, **kwargs)
  return ef.evaluate(cfg, tmp_path / f"{method}_{kwargs.get('lr', 'lr')}", progress=False)


def test_dreambooth_makes_the_base_draw_a_held_out_subject(tmp_path):
  assert is_toy_base_shipped(), "the embedded default is not the toy-world base"
  trained = evaluate(tmp_path, "dreambooth_noprior", steps=STEPS)
  control = evaluate(tmp_path, "dreambooth_noprior", steps=2, lr=0.0)  # lr 0: 2 steps move nothing
  base = evaluate(tmp_path, "base")
  match = {name: r["subject_match"] for name, r in
           (("dreambooth", trained), ("lr 0", control), ("base", base))}
  assert match["dreambooth"] >= max(match["lr 0"], match["base"]) + 0.25, match
  # The subject's generations look more like its references than the controls' do.
  assert trained["subject_similarity"] > max(control["subject_similarity"],
                                             base["subject_similarity"]), (trained, control, base)
