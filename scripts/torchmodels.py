"""PyTorch definitions of the benchmark models (random weights), and their ONNX export.

Shared by scripts/bench-make, scripts/bench-model and scripts/profile-model, so they measure the
same networks. Each factory returns (module, input shape); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path


def resnet_torch(depths: tuple[int, ...] = (2, 2, 2, 2)):
    """A ResNet of BasicBlocks (two 3x3 convolutions, a 1x1 projection shortcut where the shape
    changes), ``depths`` blocks in the stages of 64, 128, 256 and 512 channels: (2, 2, 2, 2) is
    ResNet-18, (3, 4, 6, 3) ResNet-34. Batch norms folded into the convolutions' biases."""
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

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 64, 7, 2, 3)
            self.pool = nn.MaxPool2d(3, 2, 1)
            blocks, cin = [], 64
            for stage, (cout, n) in enumerate(zip((64, 128, 256, 512), depths)):
                for b in range(n):
                    blocks.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(512, 1000)

        def forward(self, x):
            x = self.blocks(self.pool(torch.relu(self.stem(x))))
            return self.fc(torch.flatten(torch.mean(x, dim=(2, 3), keepdim=True), 1))

    return ResNet(), (1, 3, 224, 224)


def resnet18_torch():
    return resnet_torch((2, 2, 2, 2))


def resnet34_torch():
    return resnet_torch((3, 4, 6, 3))


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


def mobilenetv3_torch():
    """MobileNetV3-Large (width 1.0) at 224, written out from the paper's table: inverted residual
    blocks with 3x3 or 5x5 depthwise convolutions, squeeze-excite (global average pool, 1x1
    reduce, ReLU, 1x1 expand, hard sigmoid, multiply) on some, ReLU or hard swish; batch norms
    folded into the convolutions' biases, as in the others."""
    import torch
    from torch import nn

    def divisible(v: float, d: int = 8) -> int:
        n = max(d, int(v + d / 2) // d * d)
        return n + d if n < 0.9 * v else n

    class SqueezeExcite(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            mid = divisible(c // 4)
            self.reduce, self.expand = nn.Conv2d(c, mid, 1), nn.Conv2d(mid, c, 1)

        def forward(self, x):
            s = torch.mean(x, dim=(2, 3), keepdim=True)
            return x * nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(s))))

    class Block(nn.Module):
        def __init__(self, cin: int, k: int, hidden: int, cout: int, se: bool, hs: bool, stride: int):
            super().__init__()
            act = nn.Hardswish if hs else nn.ReLU
            layers = [] if hidden == cin else [nn.Conv2d(cin, hidden, 1), act()]
            layers += [nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden), act()]
            if se:
                layers.append(SqueezeExcite(hidden))
            layers.append(nn.Conv2d(hidden, cout, 1))
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    class MobileNetV3(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [nn.Conv2d(3, 16, 3, 2, 1), nn.Hardswish()], 16
            # kernel, expansion, out, squeeze-excite, hard swish, stride
            for k, e, c, se, hs, s in ((3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2),
                                       (3, 72, 24, False, False, 1), (5, 72, 40, True, False, 2),
                                       (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
                                       (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1),
                                       (3, 184, 80, False, True, 1), (3, 184, 80, False, True, 1),
                                       (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
                                       (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1),
                                       (5, 960, 160, True, True, 1)):
                layers.append(Block(cin, k, e, c, se, hs, s))
                cin = c
            layers += [nn.Conv2d(cin, 960, 1), nn.Hardswish()]
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(), nn.Linear(1280, 1000))

        def forward(self, x):
            return self.head(torch.flatten(torch.mean(self.features(x), dim=(2, 3), keepdim=True), 1))

    return MobileNetV3(), (1, 3, 224, 224)


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
# Second models (scripts/bench-model --second): not tuned themselves, made after the first of their
# pair was tuned, to show what the shared database gives a model it never measured.
SECOND_MODELS = {"resnet34": resnet34_torch, "mobilenetv3": mobilenetv3_torch}


def export(name: str, path: Path, seed: int = 0) -> tuple[Path, tuple[int, ...]]:
    """``name``'s model with seeded random weights, exported to ONNX at ``path``."""
    import torch

    torch.manual_seed(seed)
    module, shape = {**MODELS, **SECOND_MODELS}[name]()
    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, (torch.randn(*shape),), str(path), input_names=["input"], output_names=["output"],
                          opset_version=17, dynamo=False)
    return path, shape
