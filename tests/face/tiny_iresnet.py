"""A tiny IResNet in torch after insightface's `arcface_torch/backbones/iresnet.py` (random weights
and batch-norm statistics; narrow widths, few blocks, the real 112x112 input and 512-d embedding),
exported as arcface_torch's `torch2onnx.py` exports the released `w600k_r50.onnx` /
`glintr100.onnx`: the TorchScript exporter, opset 11, eval mode (so batch norm after a convolution
is folded into it), batch dimension renamed "None". torch is imported when used (the verify extra)."""

from __future__ import annotations

import functools
import warnings

STEM, WIDTHS, LAYERS, EMBEDDING = 8, (8, 16, 16, 24), (2, 1, 1, 1), 512


@functools.cache
def _modules():
  """(IBasicBlock, IResNet) torch module classes."""
  import torch
  from torch import nn

  class IBasicBlock(nn.Module):
    """insightface's IBasicBlock: bn1 -> conv1 -> bn2 -> prelu -> conv2 (stride) -> bn3, + shortcut."""

    def __init__(self, inplanes, planes, stride):
      super().__init__()
      self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
      self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
      self.prelu = nn.PReLU(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
      self.downsample = None
      if stride != 1 or inplanes != planes:
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                        nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
      out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
      return out + (x if self.downsample is None else self.downsample(x))

  class IResNet(nn.Module):
    """insightface's IResNet with its widths as arguments (theirs: 64, (64, 128, 256, 512))."""

    def __init__(self, stem, widths, layers, embedding, normalize_inside=False):
      super().__init__()
      self.normalize_inside = normalize_inside     # an MXNet conversion's (x - 127.5) * 0.0078125
      self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(stem, eps=1e-5)
      self.prelu = nn.PReLU(stem)
      blocks, inplanes = [], stem
      for width, n in zip(widths, layers):
        stage = [IBasicBlock(inplanes, width, 2)] + [IBasicBlock(width, width, 1) for _ in range(n - 1)]
        blocks.append(nn.Sequential(*stage))
        inplanes = width
      self.layer1, self.layer2, self.layer3, self.layer4 = blocks
      self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-5)
      self.dropout = nn.Dropout(p=0.0)
      self.fc = nn.Linear(inplanes * 7 * 7, embedding)
      self.features = nn.BatchNorm1d(embedding, eps=1e-5)

    def forward(self, x):
      if self.normalize_inside:
        x = (x - 127.5) * 0.0078125
      x = self.prelu(self.bn1(self.conv1(x)))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      x = self.dropout(torch.flatten(self.bn2(x), 1))
      return self.features(self.fc(x))

  return IBasicBlock, IResNet


def build(seed: int = 0, *, stem=STEM, widths=WIDTHS, layers=LAYERS, embedding=EMBEDDING,
          normalize_inside: bool = False):
  """An IResNet in eval mode with random weights, batch-norm statistics and PReLU slopes."""
  import torch
  from torch import nn
  net = _modules()[1](stem, widths, layers, embedding, normalize_inside)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
      elif isinstance(m, nn.PReLU):
        m.weight.copy_(0.5 * torch.rand(m.weight.shape, generator=g))
  return net.eval()


def export(net, path, fold: bool = True, rename=None):
  """ONNX file of `net` as torch2onnx.py writes it: opset 11, eval; `fold=False` keeps batch
  norms apart (as MXNet files); `rename` {op type: node name} renames nodes (MXNet's
  `_minusscalar0`, `_mulscalar0`)."""
  import onnx
  import torch
  with warnings.catch_warnings():     # the TorchScript exporter's deprecation notices
    warnings.simplefilter("ignore")
    torch.onnx.export(net, torch.zeros(1, 3, 112, 112), str(path), input_names=["input.1"],
                      opset_version=11, dynamo=False, keep_initializers_as_inputs=False,
                      training=torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE)
  model = onnx.load(str(path))
  model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "None"
  for node in model.graph.node:
    node.name = (rename or {}).get(node.op_type, node.name)
  onnx.save(model, str(path))
  return path
