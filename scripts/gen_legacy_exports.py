#!/usr/bin/env python3
"""Writes ONNX exports of committed fixture checkpoints whose exporter derived new
initializers from the parameters (the legacy exporter, a float16 model), for the tests.

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
- fixtures/digits_f16/half/{folded,unfolded}.onnx: the digits MLP (fc1 -> bn -> ReLU ->
  fc2) in the state of digits_f16/checkpoints/epoch_15.safetensors, as a float16 model
  (`model.half()`): `torch.onnx.export`'s defaults (BatchNorm folded into fc1 in float16)
  and `dynamo=True, optimize=False` (BatchNorm kept).

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

from gen_fixtures import MLP, DistMult  # noqa: E402
from gen_folded_fixture import Net  # noqa: E402


def export(model, args, path, **kw):
    kw.setdefault("dynamo", False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, args, path, **kw)
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

    sd = load_file(os.path.join(FIX, "digits_f16", "checkpoints", "epoch_15.safetensors"))
    mlp = MLP()
    mlp.load_state_dict(sd)
    mlp = mlp.half().eval()
    os.makedirs(os.path.join(FIX, "digits_f16", "half"), exist_ok=True)
    x = (torch.zeros(2, 64, dtype=torch.float16),)
    dyn = {"x": {0: torch.export.Dim("batch")}}
    for name, kw in (("folded", {}), ("unfolded", dict(optimize=False))):
        path = os.path.join(FIX, "digits_f16", "half", f"{name}.onnx")
        export(mlp, x, path, dynamo=True, dynamic_shapes=dyn, input_names=["x"], output_names=["logits"], **kw)
        if os.path.exists(path + ".data"):
            # One self-contained file per model.
            m = onnx.load(path)
            os.remove(path + ".data")
            onnx.save_model(m, path, save_as_external_data=False)


if __name__ == "__main__":
    main()
