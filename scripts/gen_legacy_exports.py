#!/usr/bin/env python3
"""Writes legacy-exporter ONNX models of committed fixture checkpoints, for the tests of
models whose exporter derived new initializers from the parameters.

    python scripts/gen_legacy_exports.py      # needs torch, onnx, safetensors (no training)

`torch.onnx.export(model, args, path)` before torch 2.9 (and `dynamo=False` since) is the
TorchScript-based exporter with `do_constant_folding=True` and the model in eval mode:

- fixtures/bn_folded/legacy.onnx: the bn_folded CNN (scripts/gen_folded_fixture.py) in
  the state of checkpoints/epoch_6.safetensors. Both BatchNorms are folded into their
  convolutions and the folded weights and biases are renamed `onnx::Conv_N` (conv1 had
  a bias, conv2 had none).
- fixtures/kge/legacy/model.onnx: the DistMult model (scripts/gen_fixtures.py) in the state of
  checkpoints/epoch_10.safetensors. Its scores `(E[h] * R[r]) @ E.t()` make the exporter
  store `ent.weight` transposed as a new initializer `onnx::MatMul_N` (`ent.weight`
  stays too, for the lookup).

Deterministic: the models are loaded from the committed checkpoints; only the exporter's
version may change the bytes (these were written with torch 2.15).
"""

import contextlib
import io
import os
import sys

import onnx
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures")
sys.path.insert(0, HERE)

from gen_fixtures import DistMult  # noqa: E402
from gen_folded_fixture import Net  # noqa: E402


def export(model, args, path, **kw):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, args, path, dynamo=False, **kw)
    m = onnx.load(path)
    inits = [(i.name, list(i.dims)) for i in m.graph.initializer]
    print(f"{os.path.relpath(path, FIX)}: ops {sorted({n.op_type for n in m.graph.node})}; initializers {inits}")


def main():
    net = Net()
    net.load_state_dict(load_file(os.path.join(FIX, "bn_folded", "checkpoints", "epoch_6.safetensors")))
    net.eval()
    export(
        net,
        (torch.zeros(2, 1, 8, 8),),
        os.path.join(FIX, "bn_folded", "legacy.onnx"),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}},
    )

    kge = DistMult(40, 4, 16)
    kge.load_state_dict(load_file(os.path.join(FIX, "kge", "checkpoints", "epoch_10.safetensors")))
    kge.eval()
    idx = torch.zeros(2, dtype=torch.int64)
    export(
        kge,
        (idx, idx),
        os.path.join(FIX, "kge", "legacy", "model.onnx"),
        input_names=["h", "r"],
        output_names=["scores"],
        dynamic_axes={"h": {0: "batch"}, "r": {0: "batch"}, "scores": {0: "batch"}},
    )


if __name__ == "__main__":
    main()
