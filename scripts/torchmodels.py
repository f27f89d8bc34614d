"""PyTorch definitions of the benchmark models (random weights), and their ONNX export.

Shared by scripts/bench-make and scripts/bench-model, so both measure the same networks. Each
factory returns (module, input shape); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path


def resnet18_torch():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)
            self.short = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

        def forward(self, x):
            y = self.c2(torch.relu(self.c1(x)))
            return torch.relu(y + (self.short(x) if self.short is not None else x))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 64, 7, 2, 3)
            self.pool = nn.MaxPool2d(3, 2, 1)
            blocks, cin = [], 64
            for stage, cout in enumerate((64, 128, 256, 512)):
                for b in range(2):
                    blocks.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(512, 1000)

        def forward(self, x):
            x = self.blocks(self.pool(torch.relu(self.stem(x))))
            return self.fc(torch.flatten(torch.mean(x, dim=(2, 3), keepdim=True), 1))

    return ResNet18(), (1, 3, 224, 224)


def encoder_torch():
    """A post-norm transformer encoder block, written out (nn.TransformerEncoderLayer's fused
    attention path does not export with the TorchScript exporter of recent PyTorch)."""
    import torch
    from torch import nn

    class EncoderBlock(nn.Module):
        def __init__(self, d: int = 256, heads: int = 4, ffn: int = 1024):
            super().__init__()
            self.heads, self.dh = heads, d // heads
            self.qkv = nn.Linear(d, 3 * d)
            self.out = nn.Linear(d, d)
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.ff1, self.ff2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-2, -1) / self.dh ** 0.5, dim=-1)
            y = (att @ v).transpose(1, 2).reshape(b, n, d)
            x = self.ln1(x + self.out(y))
            return self.ln2(x + self.ff2(torch.relu(self.ff1(x))))

    return EncoderBlock(), (1, 128, 256)


def mobilenetv2_torch():
    """MobileNetV2 (width 1.0), written out: inverted residual blocks of a 1x1 expansion, a 3x3
    depthwise convolution and a 1x1 projection, ReLU6 (ONNX Clip) after the first two; batch
    norms folded into the convolutions' biases, as in the ResNet."""
    import torch
    from torch import nn

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int):
            super().__init__()
            hidden = cin * expand
            layers = [] if expand == 1 else [nn.Conv2d(cin, hidden, 1), nn.ReLU6()]
            layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden), nn.ReLU6(), nn.Conv2d(hidden, cout, 1)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU6()], 32
            for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1)):
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers += [nn.Conv2d(cin, 1280, 1), nn.ReLU6()]
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(1280, 1000)

        def forward(self, x):
            return self.fc(torch.flatten(torch.mean(self.features(x), dim=(2, 3), keepdim=True), 1))

    return MobileNetV2(), (1, 3, 224, 224)


def detector_torch():
    """A DBNet-style text detector: a small CNN backbone (strides 4 to 32), an FPN (1x1 lateral
    convolutions, nearest 2x upsampling and adds, 3x3 smoothing, all levels upsampled to 1/4 and
    concatenated) and DB's probability head (3x3 convolution, two 2x2 stride-2 transposed
    convolutions, sigmoid), on a 1x3x320x320 image."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def stage(cin: int, cout: int, stride: int):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1), nn.ReLU())

    class Detector(nn.Module):
        def __init__(self, inner: int = 64):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
            chans = (32, 64, 128, 256)
            self.stages = nn.ModuleList([stage(16, 32, 2), stage(32, 64, 2), stage(64, 128, 2), stage(128, 256, 2)])
            self.lateral = nn.ModuleList([nn.Conv2d(c, inner, 1) for c in chans])
            self.smooth = nn.ModuleList([nn.Conv2d(inner, inner // 4, 3, 1, 1) for _ in chans])
            self.head = nn.Sequential(nn.Conv2d(inner, inner // 4, 3, 1, 1), nn.ReLU(),
                                      nn.ConvTranspose2d(inner // 4, inner // 4, 2, 2), nn.ReLU(),
                                      nn.ConvTranspose2d(inner // 4, 1, 2, 2), nn.Sigmoid())

        def forward(self, x):
            feats, y = [], self.stem(x)
            for s in self.stages:
                y = s(y)
                feats.append(y)
            lat = [lt(f) for lt, f in zip(self.lateral, feats)]
            for i in range(len(lat) - 2, -1, -1):
                lat[i] = lat[i] + F.interpolate(lat[i + 1], scale_factor=2.0, mode="nearest")
            outs = [F.interpolate(sm(p), scale_factor=float(2 ** i), mode="nearest") if i else sm(p)
                    for i, (sm, p) in enumerate(zip(self.smooth, lat))]
            return self.head(torch.cat(outs, dim=1))

    return Detector(), (1, 3, 320, 320)


MODELS = {"resnet18": resnet18_torch, "mobilenetv2": mobilenetv2_torch, "encoder": encoder_torch,
          "detector": detector_torch}


def export(name: str, path: Path, seed: int = 0) -> tuple[Path, tuple[int, ...]]:
    """``name``'s model with seeded random weights, exported to ONNX at ``path``."""
    import torch

    torch.manual_seed(seed)
    module, shape = MODELS[name]()
    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, (torch.randn(*shape),), str(path), input_names=["input"], output_names=["output"],
                          opset_version=17, dynamo=False)
    return path, shape
