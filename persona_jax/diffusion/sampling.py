"""Sampling: text encode -> `lax.fori_loop` over the sampler's steps (diffusion/samplers.py: DDIM,
Euler, Euler ancestral, DPM-Solver++ 2M) with classifier-free guidance -> VAE decode, as three
compiled programs per shape (`generate`: prepare, a chunk of steps, decode), called from the host.

Only shapes, the sampler and the step count are static. Guidance scale, guidance rescale, eta and
the step range of a chunk are traced arrays, so changing them never recompiles, and no program
holds a host callback (the progress bar ticks from the host between chunks): JAX's persistent
compilation cache stores them all, and a second process with the same shapes compiles nothing.
Each image has its own key, `fold_in(key(seed), index)`: image i starts from the same latents,
and draws the same eta noise, whatever the batch it is generated in.

The conditioning is the method's (diffusion/conditioning.py, the protocol training uses too):
`prepare` runs once (encode the prompts, the negative prompts, the images), `at` gives the
conditional half's UNet keyword arguments at every step and may depend on the step, the timestep
and the current latents (E4T recomputes its word embedding from the noisy latent; FastComposer
switches conditioning after a few steps), `negative` the unconditional half's. The keyword
arguments may carry the UNet add-ons' streams (`"streams": {...}`, models/addons.py). Whatever the
conditioning reads from `inputs` is traced (scales such as IP-Adapter's, the adapter's beta, a
concept-token alpha, a delay step): changing it does not recompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from persona_jax.diffusion.samplers import Sampler, make_sampler
from persona_jax.diffusion.schedules import SchedulerConfig
from persona_jax.diffusion.conditioning import TextConditioning
from persona_jax.models.components import SDModels
from persona_jax.models.vae import AutoencoderKL
from persona_jax.program_store import StoredProgram, register_serialization

log = logging.getLogger(__name__)


def pipeline_scheduler(config: SchedulerConfig, sdxl: bool = False) -> SchedulerConfig:
  """The scheduler config as diffusers' StableDiffusionPipeline samples with it (SDXL's pipeline
  takes it as it is).

  The pipeline rewrites outdated configs (SD 1.x's PNDM config has no `clip_sample`, which DDIM
  would default to True and clip the latents): `steps_offset` becomes 1 and `clip_sample` False,
  with a deprecation warning. We do the same, with a log line, so samples match.
  """
  if sdxl:
    return config
  fixed = dataclasses.replace(config, steps_offset=1, clip_sample=False)
  if fixed != config:
    _log_rewrite(config.steps_offset, config.clip_sample)
  return fixed


@functools.lru_cache(maxsize=None)
def _log_rewrite(steps_offset, clip_sample) -> None:
  """Logs the rewrite once per process and config, not once per batch."""
  log.info("scheduler config: using steps_offset=1 and clip_sample=False for sampling, as "
           "diffusers' StableDiffusionPipeline does (the config says %s, %s)",
           steps_offset, clip_sample)


def guide(out_uncond, out_cond, guidance, guidance_rescale):
  """Classifier-free guidance with diffusers' `guidance_rescale` (Lin et al. 2023, section 3.4).

  As in diffusers, a guidance scale <= 1 means no guidance (the conditional output alone).
  """
  guided = out_uncond + guidance * (out_cond - out_uncond)
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(out_cond, axis=axes, keepdims=True, ddof=1)
  std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
  rescaled = guided * (std_cond / std_guided)
  guided = jnp.where(guidance_rescale > 0,
                     guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided, guided)
  return jnp.where(guidance > 1.0, guided, out_cond)


def image_keys(seed, indices):
  """One key per image: fold_in(key(seed), index). seed: scalar int; indices: [B] int -> [B] keys."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def initial_latents(keys, shape, dtype=jnp.float32):
  """x_T ~ N(0, I) per image from its key. keys: [B]; shape: (h, w, c) -> [B, h, w, c]."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape, dtype))(keys)


# Host-side progress display: `generate(..., progress=True)` ticks whatever `progress_to` installed.
_progress_bar = None


@contextlib.contextmanager
def progress_to(bar):
  """Routes the ticks of `generate(..., progress=True)` (one per step) to `bar` (a tqdm bar)."""
  global _progress_bar
  previous, _progress_bar = _progress_bar, bar
  try:
    yield bar
  finally:
    _progress_bar = previous


class Denoising(NamedTuple):
  """The denoising loop between two compiled chunks of steps: its carry and what it reads."""
  x: jax.Array            # [B, h, w, c] the current latents, in the UNet's dtype
  sampler_state: Any      # the sampler's carry (Sampler.init_state)
  state: Any              # the conditioning's `prepare` output
  uncond: Any             # the unconditional half's UNet keyword arguments (the same every step)
  keys: jax.Array         # [B] the image keys (eta and ancestral noise)


register_serialization(Denoising)      # `_prepare` returns it, `_denoise_chunk` takes it


def start_denoising(models: SDModels, sampler: Sampler, conditioning, params, inputs, keys,
                    latents) -> Denoising:
  """The loop before its first step: the conditioning prepared, x_T scaled by the sampler's
  init_noise_sigma. latents: [B, h, w, c] x_T ~ N(0, I) in the UNet's dtype."""
  state = conditioning.prepare(models, params, inputs)
  uncond = conditioning.negative(models, params, state)
  x = latents
  if sampler.init_noise_sigma != 1.0:
    x = (latents.astype(jnp.float32) * sampler.init_noise_sigma).astype(latents.dtype)
  return Denoising(x, sampler.init_state(x), state, uncond, keys)


def denoise_steps(models: SDModels, sampler: Sampler, conditioning, params, loop: Denoising,
                  guidance, guidance_rescale, eta, start, stop) -> tuple[jax.Array, Any]:
  """Steps start .. stop - 1 (traced int32 scalars) of the sampler's loop with classifier-free
  guidance -> (x, sampler_state) after them. The UNet and the conditioning's `at` see the
  sampler's scaled input (Euler's x / sqrt(sigma^2 + 1))."""
  timesteps = jnp.asarray(sampler.arrays()["timesteps"])
  x0 = loop.x

  def halves(u, c):
    """[uncond; cond] on the batch axis; a scalar leaf (a scale) applies to every example."""
    u, c = (jnp.broadcast_to(a, x0.shape[:1]) if jnp.ndim(a) == 0 else a for a in (u, c))
    return jnp.concatenate([u, c], axis=0)

  def body(i, carry):
    x, sampler_state = carry
    t = timesteps[i]
    x_in = sampler.scale_model_input(x.astype(jnp.float32), i).astype(x.dtype)
    cond, _ = conditioning.at(models, params, loop.state, x_in, jnp.broadcast_to(t, x.shape[:1]), i)
    both = jax.tree.map(halves, loop.uncond, cond)
    out = models.unet.apply({"params": params["unet"]}, jnp.concatenate([x_in, x_in], axis=0),
                            jnp.broadcast_to(t, (2 * x.shape[0],)), **both)
    out_uncond, out_cond = jnp.split(out.astype(jnp.float32), 2, axis=0)
    model_output = guide(out_uncond, out_cond, guidance, guidance_rescale)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1), x.shape[1:],
                                                 jnp.float32))(loop.keys)
    prev, sampler_state = sampler.step(model_output, x, i, sampler_state, noise, eta)
    return prev.astype(x.dtype), sampler_state

  return jax.lax.fori_loop(start, stop, body, (loop.x, loop.sampler_state))


def decode_latents(vae: AutoencoderKL, params, latents):
  """Latents (scaled, as the UNet sees them) -> images [B, H, W, 3] in [0, 1], float32.

  With `force_upcast` (SD VAEs) a half-precision VAE decodes in float32, as diffusers does.
  """
  c = vae.config
  vae_params = params["vae"]
  if c.force_upcast and jnp.dtype(c.dtype) != jnp.float32:
    vae = AutoencoderKL(dataclasses.replace(c, dtype=jnp.float32, param_dtype=jnp.float32))
    vae_params = jax.tree.map(lambda p: p.astype(jnp.float32), vae_params)
  images = vae.apply({"params": vae_params}, latents / c.scaling_factor, method="decode")
  return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


# The three compiled programs of `generate`. Their static arguments are hashable descriptions of
# the networks, the sampler and the conditioning; everything that changes between calls of one
# shape (prompts, seed, guidance, eta, the step range of a chunk, a method's knobs) is traced.
# All three keep their traced programs in the program store (program_store.py: tracing and
# lowering them was most of a warm process's start).

@functools.partial(jax.jit, static_argnames=("models", "sampler", "conditioning", "latent_shape"))
def _prepare_program(params, inputs, seed, indices, latents, *, models: SDModels,
                     sampler: Sampler, conditioning,
                     latent_shape: tuple[int, int, int]) -> Denoising:
  keys = image_keys(seed, indices)
  if latents is None:
    latents = initial_latents(keys, latent_shape, jnp.float32)
  latents = latents.astype(models.unet.config.dtype)
  return start_denoising(models, sampler, conditioning, params, inputs, keys, latents)


@functools.partial(jax.jit, static_argnames=("models", "sampler", "conditioning"))
def _denoise_chunk_program(params, loop: Denoising, guidance, guidance_rescale, eta, start, stop,
                           *, models: SDModels, sampler: Sampler, conditioning):
  return denoise_steps(models, sampler, conditioning, params, loop,
                       jnp.asarray(guidance, jnp.float32),
                       jnp.asarray(guidance_rescale, jnp.float32), jnp.asarray(eta, jnp.float32),
                       jnp.asarray(start, jnp.int32), jnp.asarray(stop, jnp.int32))


@functools.partial(jax.jit, static_argnames=("vae",))
def _decode_program(params, latents, *, vae: AutoencoderKL):
  return decode_latents(vae, params, latents)


_prepare = StoredProgram(_prepare_program, f"{__name__}._prepare")
_denoise_chunk = StoredProgram(_denoise_chunk_program, f"{__name__}._denoise_chunk")
_decode = StoredProgram(_decode_program, f"{__name__}._decode")


def generate(params, inputs, seed, indices, guidance, guidance_rescale, eta, latents=None, *,
             models: SDModels, scheduler: SchedulerConfig, num_steps: int,
             latent_shape: tuple[int, int, int], conditioning=TextConditioning(),
             decode: bool = True, progress: bool = False, sampler: str = "ddim"):
  """Text-to-image: three compiled programs per shape, run from the host.

  `_prepare` (image keys, x_T, the conditioning's prepare and negative half), `_denoise_chunk`
  (steps start .. stop - 1 of the loop; the range is traced, so every chunk of every call runs the
  same program) and `_decode` (the VAE). With `progress`, the loop runs one step per chunk and the
  host ticks the bar as each finishes (the next one already queued, so the device never waits).
  Ticking from the host, not from a callback inside the program, keeps the programs free of host
  callbacks, which JAX's persistent compilation cache refuses to store: a second process with the
  same shapes loads them instead of compiling. Their traced programs are kept in the program
  store (program_store.py), so it does not trace them either. The images are the same with or
  without progress, with or without the store.

  Args:
    params: {"unet", "text_encoder", "vae", ...} (whatever the conditioning reads too).
    inputs: the conditioning's inputs, e.g. {"ids": [B, L], "negative_ids": [B, L]}.
    seed: int scalar; indices: [B] global image indices (image i uses fold_in(key(seed), i)).
    guidance, guidance_rescale, eta: float scalars (traced: changing them does not recompile).
    latents: optional [B, h, w, c] initial latents (otherwise drawn from the image keys).
    latent_shape: (h, w, c) of the latents.
    sampler: one of diffusion/samplers.py's SAMPLERS, on `scheduler`'s schedule.
    decode: False returns the final latents instead of images.
    progress: tick the host progress bar installed by `progress_to` after every step.
  Returns:
    images [B, H, W, 3] in [0, 1] (float32), or latents [B, h, w, c].
  """
  static = dict(models=models, sampler=make_sampler(sampler, scheduler, num_steps),
                conditioning=conditioning)
  loop = _prepare(params, inputs, seed, indices, latents, latent_shape=latent_shape, **static)
  bar = _progress_bar if progress else None
  chunk = 1 if bar is not None else num_steps
  queued = None                  # the previous chunk's latents, ticked once they are computed
  for start in range(0, num_steps, chunk):
    stop = min(start + chunk, num_steps)
    x, sampler_state = _denoise_chunk(params, loop, guidance, guidance_rescale, eta, start, stop,
                                      **static)
    loop = loop._replace(x=x, sampler_state=sampler_state)
    if bar is not None:
      _tick_when_ready(bar, queued)
      queued = (x, stop - start)
  if bar is not None:
    _tick_when_ready(bar, queued)
  return _decode({"vae": params["vae"]}, loop.x, vae=models.vae) if decode else loop.x


def _tick_when_ready(bar, queued) -> None:
  """Advances `bar` by a chunk's steps once its latents are computed (`queued`: (x, steps))."""
  if queued is not None:
    jax.block_until_ready(queued[0])
    bar.update(queued[1])


def _compiled_variants() -> int:
  """How many programs `generate` has compiled in this process (tests: nothing recompiles)."""
  return sum(f._cache_size() for f in (_prepare, _denoise_chunk, _decode))


generate._cache_size = _compiled_variants
