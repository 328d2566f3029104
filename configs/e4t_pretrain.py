"""E4T domain pre-training: an encoder that predicts a concept's word embedding from one image,
and attention weight offsets, trained on many images of one domain (Gal et al. 2023).

  persona-jax train --config e4t_pretrain:tiny --workdir runs/e4t_pre
    ~1 minute on 2 CPU cores: 30 steps on the embedded default (its image_encoder/) with the
    bundled example subject standing in for a domain of balls; scripts/make_e4t_state.py runs the
    same recipe on a folder of toy-world balls.
  persona-jax train --config configs/e4t_pretrain.py --workdir runs/e4t_faces \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.data.instance_dir=/path/to/faces \\
      --config.method.image_encoder=/path/to/clip-vit-large-patch14
    The reference's recipe (mkshing/e4t-diffusion): batch 16, lr 1.6e-5, 30,000 steps (faces;
    cats 60,000, art 100,000), embedding regularization 0.01, CLIP frozen. Any transformers
    CLIPVisionModel(WithProjection) folder serves as the image encoder (the reference: OpenCLIP
    ViT-H/14).

Writes WORKDIR/e4t.safetensors (encoder and offsets), the start of `e4t_tune`.
"""

from persona_jax.train.config import base_config

VARIANTS = ("tiny",)


def get_config(arg=None):
  tiny = arg == "tiny"
  c = base_config("e4t")
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.method.class_word = "ball" if tiny else "face"
  c.data.instance_dir = "" if tiny else "/path/to/domain_images"
  c.data.prompt = "*s"
  c.data.resolution = 32 if tiny else 512
  c.optim.lr = 1e-3 if tiny else 1.6e-5
  c.steps = 30 if tiny else 30000
  c.batch_size = 4 if tiny else 16
  c.mixed_precision = "no" if tiny else "bf16"
  c.log_every = 5 if tiny else 100
  c.checkpoint_every = 10 if tiny else 1000
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 2000
  c.sample_prompts = (("a photo of a *s", "a photo of a *s on grass") if tiny else
                      ("a photo of *s", "a painting of *s in the snow"))
  c.sample_steps = 10 if tiny else 50
  return c
