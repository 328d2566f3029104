"""The diffusers PyTorch side of `persona-jax bench` (a worker process): each case as diffusers'
training scripts run it, built as one synchronous iteration."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from persona_jax.benchmark import (BATCH, DB_VARIANTS, LORA_RANK, Preset, _ids, _inputs,
                                   added_cond, db_options)


def _torch_db_step(case, unet, x, noise, t, ctx, added, sync):
  """diffusers' train_dreambooth.py step with prior preservation: one forward over instance +
  class rows, `chunk(2)`, mse + prior_loss_weight * mse, clip 1.0, AdamW."""
  import contextlib

  import torch
  bf16, remat, accum = db_options(case)
  unet.train()
  if remat:
    unet.enable_gradient_checkpointing()
  opt = torch.optim.AdamW(unet.parameters(), lr=5e-6, weight_decay=1e-2)
  b = x.shape[0]
  m = b // accum // 2
  micro = [torch.cat([torch.arange(k * m, (k + 1) * m), b // 2 + torch.arange(k * m, (k + 1) * m)])
           for k in range(accum)]
  autocast = (lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

  def run():
    for rows in micro:
      with autocast():
        pred = unet(x[rows], t[rows], ctx[rows], added_cond_kwargs=_rows(added, rows)).sample
      pred, pred_prior = pred.float().chunk(2)
      target, target_prior = noise[rows].float().chunk(2)
      loss = (torch.nn.functional.mse_loss(pred, target)
              + 1.0 * torch.nn.functional.mse_loss(pred_prior, target_prior)) / accum
      loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
  return run


def _rows(added, rows):
  """SDXL's added_cond_kwargs at `rows` (None without them)."""
  return None if added is None else {k: v[rows] for k, v in added.items()}


def _torch_cd_step(unet, x, noise, t, ctx, added, sync):
  """diffusers' train_custom_diffusion.py step (no modifier token): CustomDiffusionAttnProcessor2_0
  with train_kv on every cross-attention, initialized from to_k/to_v, AdamW over them, clip 1.0."""
  from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
  unet.requires_grad_(False)
  weights = unet.state_dict()
  procs = {}
  for name in unet.attn_processors:
    layer = name.split(".processor")[0]
    if name.endswith("attn1.processor"):
      procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False,
                                                    hidden_size=None, cross_attention_dim=None)
      continue
    w_k = weights[layer + ".to_k.weight"]
    procs[name] = CustomDiffusionAttnProcessor2_0(
        train_kv=True, train_q_out=False, hidden_size=w_k.shape[0],
        cross_attention_dim=w_k.shape[1]).to(device=w_k.device, dtype=w_k.dtype)
    procs[name].load_state_dict({"to_k_custom_diffusion.weight": w_k,
                                 "to_v_custom_diffusion.weight": weights[layer + ".to_v.weight"]})
  params = [p for proc in procs.values() for p in proc.parameters()]
  unet.set_attn_processor(dict(procs))         # diffusers pops the entries of the dict it gets
  return _torch_adapter_run(unet, params, 1e-5, x, noise, t, ctx, added, sync)


def _torch_adapter_run(unet, params, lr, x, noise, t, ctx, added, sync, prior: bool = False,
                       autocast=None):
  """The timed step of a frozen UNet with trainable `params` (LoRA, Custom Diffusion): forward,
  backward, clipping 1.0, AdamW. `prior`: the second half of the rows are class rows,
  mse(instance) + mse(class) as train_dreambooth_lora_sdxl.py's prior preservation. `autocast`:
  a context factory the forward runs in (e.g. bf16 autocast), None: none."""
  import contextlib

  import torch
  unet.train()
  opt = torch.optim.AdamW(params, lr=lr)
  mse = torch.nn.functional.mse_loss
  autocast = autocast or contextlib.nullcontext

  def run():
    with autocast():
      pred = unet(x, t, ctx, added_cond_kwargs=added).sample.float()
    if prior:
      (pred, pred_prior), (target, target_prior) = pred.chunk(2), noise.float().chunk(2)
      loss = mse(pred, target) + 1.0 * mse(pred_prior, target_prior)
    else:
      loss = mse(pred, noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
  return run


def _torch_lora_step(unet, x, noise, t, ctx, added, sync, prior: bool = False, autocast=None):
  """diffusers' train_dreambooth_lora.py step: peft LoRA (rank 4, alpha 4, gaussian init) on
  to_q/to_k/to_v/to_out.0, UNet frozen, AdamW over the adapter, clipping 1.0 (`prior`: with
  prior preservation; `autocast`: the forward's context factory)."""
  from peft import LoraConfig
  unet.requires_grad_(False)
  unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
  params = [p for p in unet.parameters() if p.requires_grad]
  return _torch_adapter_run(unet, params, 1e-4, x, noise, t, ctx, added, sync, prior,
                            autocast)


def _torch_ti_step(unet, text_dir: Path, x, noise, t, tdtype, device, sync):
  """diffusers' textual_inversion.py step: embedding table trainable (AdamW over all of it),
  text encoder and UNet frozen, other rows restored after the step."""
  import torch
  from transformers import CLIPTextModel
  text = CLIPTextModel.from_pretrained(text_dir).to(device=device, dtype=tdtype)
  text.resize_token_embeddings(text.config.vocab_size + 1)
  table = text.get_input_embeddings().weight
  with torch.no_grad():
    table[-1] = table[1000]
  unet.requires_grad_(False)
  text.requires_grad_(False)
  table.requires_grad_(True)
  text.train()
  unet.train()
  opt = torch.optim.AdamW([table], lr=1e-3)
  original = table.detach().clone()
  keep = torch.ones(table.shape[0], dtype=torch.bool, device=device)
  keep[-1] = False
  ids = torch.from_numpy(_ids(x.shape[0])).to(device)

  def run():
    context = text(ids)[0]
    pred = unet(x, t, context).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      table[keep] = original[keep]
    sync()
  return run


def torch_case(case: str, unet_dir: Path, preset: Preset, dtype: str):
  import torch
  from diffusers import UNet2DConditionModel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  unet = UNet2DConditionModel.from_pretrained(unet_dir).to(device=device, dtype=tdtype)
  x, t, ctx, noise = (torch.from_numpy(np.asarray(a)).to(device)
                      for a in _inputs(preset, BATCH[case], channels_last=False))
  x, ctx, noise = x.to(tdtype), ctx.to(tdtype), noise.to(tdtype)
  added = added_cond(preset, BATCH[case])            # SDXL: pooled text embeds, time ids
  if added is not None:
    added = {k: torch.from_numpy(v).to(device=device, dtype=tdtype) for k, v in added.items()}
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if case == "unet_forward":
    unet.eval()

    def run():
      with torch.no_grad():
        unet(x, t, ctx, added_cond_kwargs=added)
      sync()
    return run
  if case == "ti_train":
    return _torch_ti_step(unet, unet_dir.parent / "text_encoder", x, noise, t, tdtype, device, sync)
  if case in DB_VARIANTS:
    return _torch_db_step(case, unet, x, noise, t, ctx, added, sync)
  if case in ("lora_train", "dblora_train"):
    return _torch_lora_step(unet, x, noise, t, ctx, added, sync, prior=case == "dblora_train")
  if case == "cd_train":
    return _torch_cd_step(unet, x, noise, t, ctx, added, sync)
  unet.train()
  opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)

  def run():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(
        unet(x, t, ctx, added_cond_kwargs=added).sample.float(), noise.float())
    loss.backward()
    opt.step()
    sync()
  return run


