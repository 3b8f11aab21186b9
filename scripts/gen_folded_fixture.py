#!/usr/bin/env python3
"""Writes fixtures/bn_folded/: a small CNN with BatchNorm, exported the way
`torch.onnx.export` does by default (BatchNorm folded into the convolutions), and the same
network exported without folding, for tests/batchnorm.rs.

    python scripts/gen_folded_fixture.py        # needs torch, onnx, numpy, safetensors

The network: conv1 (1→4, with bias) → bn1 → ReLU → max-pool → conv2 (4→8, no bias) →
bn2 → ReLU → global mean → fc (8→3). conv2 has no bias, so folding bn2 creates a new bias
initializer; conv1's folded bias keeps the name `conv1.bias`. Trained for 6 epochs of SGD
on synthetic 8×8 images whose class is a bright band; one safetensors checkpoint per epoch
(`safetensors.torch.save_file(model.state_dict())`).

Files:
- checkpoints/epoch_{1..6}.safetensors
- folded.onnx (+ .data): `torch.onnx.export(model, (x[:2],), path)`, the defaults (the
  model in eval mode, as after the last epoch: it is the last checkpoint's state)
- unfolded.onnx (+ .data): `torch.onnx.export(..., dynamo=True, optimize=False)`, same state
- val.npz: x float32 [160, 1, 8, 8], y int64 [160]
Deterministic (seeded); the exporter's version may change the ONNX bytes.
"""

import contextlib
import io
import os
import shutil

import numpy as np
import onnx
import torch
import torch.nn as nn
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "bn_folded")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x))).mean((2, 3))
        return self.fc(x)


def quiet(f, *args, **kw):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return f(*args, **kw)


def main():
    torch.manual_seed(0)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "checkpoints"))
    n = 480
    y = torch.randint(0, 3, (n,))
    x = torch.randn(n, 1, 8, 8) * 1.0
    for k in range(3):
        x[y == k, 0, k * 2 + 1 : k * 2 + 3, :] += 0.45
    xv, yv, xt, yt = x[:160], y[:160], x[160:], y[160:]
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    for epoch in range(1, 7):
        model.train()
        for i in range(0, len(xt), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i : i + 32]), yt[i : i + 32]).backward()
            opt.step()
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(OUT, "checkpoints", f"epoch_{epoch}.safetensors"))
    model.eval()
    np.savez(os.path.join(OUT, "val.npz"), x=xv.numpy(), y=yv.numpy())
    example = (xv[:2],)
    quiet(torch.onnx.export, model, example, os.path.join(OUT, "folded.onnx"))
    quiet(
        torch.onnx.export,
        model,
        example,
        os.path.join(OUT, "unfolded.onnx"),
        dynamo=True,
        optimize=False,
    )
    for name in ("folded.onnx", "unfolded.onnx"):
        m = onnx.load(os.path.join(OUT, name), load_external_data=False)
        ops = sorted({node.op_type for node in m.graph.node})
        inits = [i.name for i in m.graph.initializer]
        print(f"{name}: ops {ops}; initializers {inits}")


if __name__ == "__main__":
    main()
