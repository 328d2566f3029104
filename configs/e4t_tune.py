"""E4T domain tuning: a few steps on one image from an e4t_pretrain state; encoder, weight
offsets and the whole UNet train (Gal et al. 2023: "a single image and as few as 5 training
steps").

  persona-jax train --config e4t_tune:tiny --workdir runs/e4t
    ~1 minute on 2 CPU cores: 15 steps on the first image of the bundled example subject (a pink
    ball with yellow dots), starting from the small pre-trained state shipped in
    persona_jax/assets/e4t_tiny/ (scripts/make_e4t_state.py), or from an e4t_pretrain run with
    --config.method.pretrained=runs/e4t_pre.
  persona-jax train --config configs/e4t_tune.py --workdir runs/e4t_face \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.method.pretrained=runs/e4t_faces \\
      --config.method.image_encoder=/path/to/clip-vit-large-patch14 \\
      --config.data.instance_dir=/path/to/one_face
    The reference's recipe: 15 steps, batch 16 of augmented copies of the image (random flips and
    zoomed random crops here), lr 1.6e-5, embedding regularization 1e-4.
  persona-jax sample --e4t runs/e4t --image /path/to/the/image.png --prompt "a painting of *s" --out out

Writes WORKDIR/e4t.safetensors (encoder, offsets and the tuned UNet).
"""

from persona_jax.train.config import base_config

VARIANTS = ("tiny",)


def get_config(arg=None):
  tiny = arg == "tiny"
  c = base_config("e4t")
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.method.phase = "tune"
  c.method.class_word = "ball" if tiny else "face"
  c.method.embedding_reg = 1e-4
  c.method.pretrained = "shipped" if tiny else "/path/to/e4t_pretrain/workdir"
  c.data.instance_dir = "" if tiny else "/path/to/one/image"
  c.data.prompt = "*s"
  c.data.resolution = 32 if tiny else 512
  c.data.center_crop = False
  c.data.random_zoom = 1.25
  c.data.num_images = 1
  c.optim.lr = 1e-4 if tiny else 1.6e-5
  c.steps = 15
  c.batch_size = 4 if tiny else 16
  c.mixed_precision = "no" if tiny else "bf16"
  c.log_every = 5
  c.checkpoint_every = 15
  c.keep_checkpoints = 1
  c.sample_prompts = (("a photo of a *s", "a photo of a *s on grass") if tiny else
                      ("a photo of *s", "a painting of *s in the snow"))
  c.sample_steps = 10 if tiny else 50
  return c
