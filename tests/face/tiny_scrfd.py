"""A tiny SCRFD in torch with the output layout of insightface's released detectors, exported to
ONNX as they were (TorchScript exporter, opset 11), and images it finds faces in.

Outputs, in order: sigmoid scores of strides 8, 16, 32, then box distances (left, top, right,
bottom), then 5 keypoint offsets (x, y), in stride units, with 2 anchors per position. The
released `det_10g.onnx` / `scrfd_10g_bnkps.onnx` give each as [H/s * W/s * 2, C], rows ordered
y, x, anchor (mmdet's `permute(2, 3, 0, 1).reshape(-1, C)`); `batched=True` gives the later
export's [1, H/s * W/s * 2, C]."""

from __future__ import annotations

import warnings

import numpy as np

STRIDES = (8, 16, 32)


def build(seed: int = 0, *, batched: bool = False, width: int = 8):
  """A TinySCRFD module with random weights (torch imported here: the verify extra)."""
  import torch
  from torch import nn

  class TinySCRFD(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = nn.Conv2d(3, width, 8, stride=8)
      self.down = nn.ModuleList([nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(2)])
      self.cls = nn.ModuleList([nn.Conv2d(width, 2, 3, padding=1) for _ in STRIDES])
      self.reg = nn.ModuleList([nn.Conv2d(width, 8, 3, padding=1) for _ in STRIDES])
      self.kps = nn.ModuleList([nn.Conv2d(width, 20, 3, padding=1) for _ in STRIDES])

    def features(self, x):
      f = [torch.relu(self.stem(x))]
      for conv in self.down:
        f.append(torch.relu(conv(f[-1])))
      return f

    def flat(self, x, channels):
      if batched:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, channels)
      return x.permute(2, 3, 0, 1).reshape(-1, channels)

    def forward(self, x):
      f = self.features(x)
      scores = [self.flat(torch.sigmoid(c(y)), 1) for c, y in zip(self.cls, f)]
      boxes = [self.flat(nn.functional.softplus(r(y)) + 0.5, 4) for r, y in zip(self.reg, f)]
      kps = [self.flat(k(y), 10) for k, y in zip(self.kps, f)]
      return tuple(scores + boxes + kps)

  torch.manual_seed(seed)
  return TinySCRFD().eval()


def calibrate(model, image, fraction: float = 0.004):
  """Scale and shift each score head so that about `fraction` of the anchors of uint8 RGB
  `image` (letterboxed as the detector will see it) score above 0.5."""
  import torch
  x = torch.from_numpy(((image.astype(np.float32) - 127.5) / 128).transpose(2, 0, 1)[None].copy())
  with torch.no_grad():
    for conv, feature in zip(model.cls, model.features(x)):
      logits = conv(feature)
      gain = 2.0 / float(logits.std())
      conv.weight.mul_(gain)
      conv.bias.mul_(gain)
      conv.bias.sub_(float(torch.quantile(logits * gain, 1 - fraction)))
  return model


def export(model, path, size=None):
  """ONNX file of `model`: opset 11, TorchScript exporter, input "input.1" [1, 3, H, W] with H, W
  dynamic ("?") unless size (width, height) fixes them, numbered outputs."""
  import torch
  width, height = size or (640, 640)
  dynamic = None if size else {"input.1": {2: "?", 3: "?"}}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(model, (torch.zeros(1, 3, height, width),), str(path), dynamo=False,
                      opset_version=11, input_names=["input.1"], dynamic_axes=dynamic)
  return path


def image(seed: int, shape, faces: int = 3) -> np.ndarray:
  """uint8 RGB [H, W, 3]: a smooth random background with a few bright and dark discs."""
  rng = np.random.default_rng(seed)
  h, w = shape
  coarse = rng.uniform(40, 215, (6, 6, 3))
  yy, xx = np.mgrid[0:h, 0:w]
  out = coarse[yy * 6 // h, xx * 6 // w]
  for _ in range(faces):
    r = rng.uniform(0.05, 0.2) * min(h, w)
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    out[disc] = rng.choice([15.0, 240.0]) + rng.normal(0, 8, (disc.sum(), 3))
  return np.clip(out + rng.normal(0, 4, out.shape), 0, 255).astype(np.uint8)
