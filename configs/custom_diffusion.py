"""Custom Diffusion: fine-tune the cross-attention keys and values and a modifier token per
concept, with regularization images and the zoom augmentation (Kumari et al. 2023).

  persona-jax train --config custom_diffusion:tiny --workdir runs/cd
    ~2 minutes on 2 CPU cores: 8 regularization images sampled from the embedded default, then
    30 steps on the bundled example subject (the default model is random until the toy-world
    model lands).
  persona-jax train --config configs/custom_diffusion.py --workdir runs/cd \\
      --config.model=/path/to/stable-diffusion-v1-5 --config.data.instance_dir=/path/to/cat \\
      --config.data.prompt="photo of a <new1> cat" --config.data.class_prompt="photo of a cat"
    The paper's recipe: 4 instance + 4 regularization rows per step, lr 1e-5 scaled by the 8 rows
    (8e-5), 250 steps, 200 regularization images (generated into WORKDIR/class_images unless
    data.class_dir holds them; the paper retrieves real ones: put them in data.class_dir with
    data.class_generate=False), zoom augmentation, modifier token initialized from token 42170.
    Faces: --config.method.freeze_model=crossattn (all of attn2).
    Two concepts jointly (500 steps in the paper):
      --config.method.modifier_tokens='("<new1>", "<new2>")' \\
      --config.method.initializer_tokens='(42170, 47629)' \\
      --config.data.concepts='({"instance_dir": "/data/cat", "prompt": "photo of a <new1> cat",
          "class_prompt": "photo of a cat"}, {"instance_dir": "/data/chair",
          "prompt": "photo of a <new2> chair", "class_prompt": "photo of a chair"})'
    Separately trained concepts combine afterwards in closed form:
      persona-jax merge runs/cat runs/chair --out runs/cat+chair

Writes WORKDIR/custom_diffusion.safetensors (the trained K/V weights and modifier-token rows).
"""

from persona_jax.train.config import base_config

VARIANTS = ("tiny",)


def get_config(arg=None):
  tiny = arg == "tiny"
  c = base_config("custom_diffusion")
  c.model = "default" if tiny else "/path/to/stable-diffusion-v1-5"
  c.data.instance_dir = "" if tiny else "/path/to/images"
  c.data.caption_source = "prompt"
  c.data.prompt = "a photo of a <new1> ball" if tiny else "photo of a <new1> toy"
  c.data.resolution = 32 if tiny else 512
  c.data.num_class_images = 8 if tiny else 200
  c.data.class_prompt = "a photo of a ball" if tiny else "photo of a toy"
  c.data.class_sample_steps = 10 if tiny else 50
  c.data.zoom_augment = True
  c.optim.lr = 1e-3 if tiny else 1e-5
  c.optim.scale_lr = not tiny
  c.optim.scale_lr_class_rows = True       # the regularization rows count in the scaled lr
  c.steps = 30 if tiny else 250
  c.batch_size = 2 if tiny else 4
  c.mixed_precision = "no" if tiny else "bf16"
  c.log_every = 5 if tiny else 25
  c.checkpoint_every = 10 if tiny else 125
  c.keep_checkpoints = 2
  c.sample_every = 0 if tiny else 125
  c.sample_prompts = (("a photo of a <new1> ball", "a photo of a <new1> ball on grass") if tiny else
                      ("photo of a <new1> toy", "photo of a <new1> toy in the snow"))
  c.sample_steps = 10 if tiny else 50
  c.sample_guidance = 6.0
  return c
