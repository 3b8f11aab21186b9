#!/usr/bin/env python3
"""Generates the data for the end-to-end benchmark (scripts/bench.sh), deterministically.

Needs: numpy, onnx (no torch, no safetensors package: the checkpoints are written by a
small writer below, in the safetensors format with a sorted header).

    python scripts/bench_make.py OUT_DIR [--in 784] [--hidden 2048,2048,1024] [--classes 10]
        [--n 20] [--rows 5000] [--val-rows 1000,2500] [--subsets 5,10] [--seed 0]
        [--arch mlp|cnn] [--channels 16,32,64] [--image 32]

writes under OUT_DIR:

* model.onnx + model.onnx.data: an MLP `x -> [Gemm -> BatchNormalization -> Relu]* ->
  Gemm -> logits` in the layout of a torch export (`fc1.weight` is [out, in], Gemm with
  transB=1, BatchNorm in eval mode), opset 17, dynamic batch dimension. Every
  initializer is stored as external data (as torch's dynamo exporter does), holding the
  base weights;
  With `--arch cnn`: a CNN `x [batch, 3, IMAGE, IMAGE] -> [Conv 3x3 (no bias) ->
  BatchNormalization -> Relu]* -> GlobalAveragePool -> Flatten -> Gemm -> logits`, one
  block per --channels entry, the first with stride 1 and the others with stride 2
  (`conv1.weight`, `bn1.*`, ..., `fc.weight`, `fc.bias`), the layout of a torch export
  that keeps BatchNorm (dynamo=True, optimize=False); labels then come from ONNX Runtime
  running the base model (needs the onnxruntime package);
* checkpoints/epoch_001.safetensors ... epoch_NNN.safetensors: torch-like state dicts
  (`fc1.weight`, `fc1.bias`, `bn1.weight`, `bn1.bias`, `bn1.running_mean`,
  `bn1.running_var`, `bn1.num_batches_tracked` (int64, not in the graph), ...), F32;
* val.npz: `x` (float32, [rows, in]) and `y` (int64 labels), plus val_R.npz for each
  R in --val-rows (the first R rows of val.npz);
* checkpoints_K/ for each K in --subsets: symbolic links to the first K checkpoints.

The checkpoints are a random walk around a base model θ*: θ_t = θ* + s_t·(r_t + e_t)
where r_t is an AR(1) drift (persists from epoch to epoch, like SGD's) and e_t is fresh
noise (which averaging removes), with a scale s_t that decays over "training". The labels
are the base model's argmax with 15% of them replaced at random. So single checkpoints
score below the base, averages of recent checkpoints score higher, and stale ensembles
lose to fresh checkpoints: ASWA makes init, hard, soft and reject decisions.

A stamp file (OUT_DIR/.stamp) records the arguments; when it matches, nothing is redone.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import numpy as np


def write_safetensors(path: str, tensors: "dict[str, np.ndarray]") -> None:
    """safetensors format: u64 header length, JSON header (sorted names), data."""
    names = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64",
             np.dtype("<i8"): "I64"}
    header = {}
    off = 0
    order = sorted(tensors)
    for name in order:
        a = tensors[name]
        n = a.nbytes
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(np.ascontiguousarray(tensors[name]).tobytes(order="C"))
    os.replace(tmp, path)


def layer_shapes(d_in: int, hidden: "list[int]", classes: int):
    """(name, shape, kind) of every state-dict entry, in network order."""
    out = []
    prev = d_in
    for i, h in enumerate(hidden, start=1):
        out += [(f"fc{i}.weight", (h, prev), "w"), (f"fc{i}.bias", (h,), "b"),
                (f"bn{i}.weight", (h,), "g"), (f"bn{i}.bias", (h,), "b"),
                (f"bn{i}.running_mean", (h,), "m"), (f"bn{i}.running_var", (h,), "v"),
                (f"bn{i}.num_batches_tracked", (), "int")]
        prev = h
    k = len(hidden) + 1
    out += [(f"fc{k}.weight", (classes, prev), "w"), (f"fc{k}.bias", (classes,), "b")]
    return out


def cnn_shapes(channels: "list[int]", classes: int):
    """(name, shape, kind) of every state-dict entry of the --arch cnn model."""
    out = []
    prev = 3
    for i, c in enumerate(channels, start=1):
        out += [(f"conv{i}.weight", (c, prev, 3, 3), "w"),
                (f"bn{i}.weight", (c,), "g"), (f"bn{i}.bias", (c,), "b"),
                (f"bn{i}.running_mean", (c,), "m"), (f"bn{i}.running_var", (c,), "v"),
                (f"bn{i}.num_batches_tracked", (), "int")]
        prev = c
    out += [("fc.weight", (classes, prev), "w"), ("fc.bias", (classes,), "b")]
    return out


def fan_in(shape) -> int:
    return int(np.prod(shape[1:]))


def base_weights(rng: np.random.Generator, shapes):
    w = {}
    for name, shape, kind in shapes:
        if kind == "w":
            w[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in(shape))))
        elif kind == "b":
            w[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
        elif kind == "g":
            w[name] = np.float32(1.0) + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
        elif kind == "m":
            w[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
        elif kind == "v":
            w[name] = np.float32(1.0) + np.abs(rng.standard_normal(shape, dtype=np.float32)) * np.float32(0.05)
    return w


def forward(w, x, hidden):
    h = x
    for i in range(1, len(hidden) + 1):
        h = h @ w[f"fc{i}.weight"].T + w[f"fc{i}.bias"]
        h = (h - w[f"bn{i}.running_mean"]) / np.sqrt(w[f"bn{i}.running_var"] + np.float32(1e-5))
        h = h * w[f"bn{i}.weight"] + w[f"bn{i}.bias"]
        np.maximum(h, 0, out=h)
    k = len(hidden) + 1
    return h @ w[f"fc{k}.weight"].T + w[f"fc{k}.bias"]


def write_initializers(out_dir: str, shapes, base):
    """Writes model.onnx.data; returns the initializers referring to it."""
    from onnx import TensorProto

    data_name = "model.onnx.data"
    inits = []
    offset = 0
    with open(os.path.join(out_dir, data_name), "wb") as f:
        for name, shape, kind in shapes:
            if kind == "int":
                continue
            a = base[name]
            pad = (-offset) % 4096
            f.write(b"\0" * pad)
            offset += pad
            f.write(a.tobytes())
            t = TensorProto()
            t.name = name
            t.data_type = TensorProto.FLOAT
            t.dims.extend(a.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(a.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            inits.append(t)
            offset += a.nbytes
    return inits


def save_model(out_dir: str, nodes, name: str, x_shape, classes: int, inits) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *x_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="aswa-merge bench_make.py")
    model.ir_version = 8
    onnx.save(model, os.path.join(out_dir, "model.onnx"))


def bn_relu(nodes, src: str, i: int) -> str:
    """Appends `bn{i}` (eval mode) and a Relu after `src`; returns the Relu's output."""
    from onnx import helper

    nodes.append(helper.make_node(
        "BatchNormalization",
        [src, f"bn{i}.weight", f"bn{i}.bias", f"bn{i}.running_mean", f"bn{i}.running_var"],
        [f"bn{i}"], name=f"bn{i}", epsilon=1e-5))
    nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"relu{i}"))
    return f"relu{i}"


def write_cnn(out_dir: str, shapes, base, channels: "list[int]", image: int, classes: int) -> None:
    from onnx import helper

    inits = write_initializers(out_dir, shapes, base)
    nodes = []
    prev = "x"
    for i in range(1, len(channels) + 1):
        stride = 1 if i == 1 else 2
        nodes.append(helper.make_node("Conv", [prev, f"conv{i}.weight"], [f"conv{i}"], name=f"conv{i}",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride]))
        prev = bn_relu(nodes, f"conv{i}", i)
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    save_model(out_dir, nodes, "bench_cnn", [3, image, image], classes, inits)


def cnn_labels(out_dir: str, x: np.ndarray) -> np.ndarray:
    """The base model's argmax, computed by ONNX Runtime."""
    import onnxruntime as ort

    s = ort.InferenceSession(os.path.join(out_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    return np.concatenate([np.argmax(s.run(None, {"x": x[i:i + 256]})[0], axis=1)
                           for i in range(0, len(x), 256)]).astype(np.int64)


def write_model(out_dir: str, shapes, base, d_in: int, classes: int) -> None:
    from onnx import helper

    inits = write_initializers(out_dir, shapes, base)
    nodes = []
    prev = "x"
    n_hidden = sum(1 for n, _, k in shapes if k == "w") - 1
    for i in range(1, n_hidden + 1):
        nodes.append(helper.make_node("Gemm", [prev, f"fc{i}.weight", f"fc{i}.bias"], [f"gemm{i}"],
                                      name=f"fc{i}", transB=1))
        prev = bn_relu(nodes, f"gemm{i}", i)
    k = n_hidden + 1
    nodes.append(helper.make_node("Gemm", [prev, f"fc{k}.weight", f"fc{k}.bias"], ["logits"],
                                  name=f"fc{k}", transB=1))
    save_model(out_dir, nodes, "bench_mlp", [d_in], classes, inits)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--in", dest="d_in", type=int, default=784)
    ap.add_argument("--hidden", default="2048,2048,1024")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--n", type=int, default=20, help="checkpoints")
    ap.add_argument("--rows", type=int, default=5000, help="validation rows (val.npz)")
    ap.add_argument("--val-rows", default="", help="also write val_R.npz with the first R rows")
    ap.add_argument("--subsets", default="", help="also make checkpoints_K/ with the first K")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.3, help="relative noise at epoch 1")
    ap.add_argument("--iid", type=float, default=0.5, help="weight of the fresh noise e_t")
    ap.add_argument("--offset", type=float, default=1.0, help="relative size of the early offset D")
    ap.add_argument("--decay", type=float, default=4.0, help="the offset decays over N/DECAY epochs")
    ap.add_argument("--arch", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--channels", default="16,32,64", help="--arch cnn: output channels per block")
    ap.add_argument("--image", type=int, default=32, help="--arch cnn: image height and width")
    args = ap.parse_args()

    hidden = [int(h) for h in args.hidden.split(",") if h]
    val_rows = [int(r) for r in args.val_rows.split(",") if r]
    subsets = [int(k) for k in args.subsets.split(",") if k]
    os.makedirs(args.out, exist_ok=True)
    stamp_path = os.path.join(args.out, ".stamp")
    stamp = json.dumps({"v": 1, **{k: v for k, v in vars(args).items()
                                   if k != "out" and (args.arch == "cnn" or k not in ("arch", "channels", "image"))}},
                       sort_keys=True)
    if os.path.exists(stamp_path) and open(stamp_path).read() == stamp:
        print(f"{args.out}: up to date", file=sys.stderr)
        return 0
    if os.path.exists(stamp_path):
        os.remove(stamp_path)

    rng = np.random.default_rng(args.seed)
    channels = [int(c) for c in args.channels.split(",") if c]
    if args.arch == "cnn":
        shapes = cnn_shapes(channels, args.classes)
    else:
        shapes = layer_shapes(args.d_in, hidden, args.classes)
    base = base_weights(rng, shapes)
    params = sum(int(np.prod(s)) for _, s, k in shapes if k != "int")
    print(f"{args.out}: {params} float parameters ({params * 4 / 1e6:.1f} MB per checkpoint), "
          f"{args.n} checkpoints, {args.rows} validation rows", file=sys.stderr)

    # Validation data: labels from the base model, 15% replaced at random.
    if args.arch == "cnn":
        write_cnn(args.out, shapes, base, channels, args.image, args.classes)
        x = rng.standard_normal((args.rows, 3, args.image, args.image), dtype=np.float32)
        y = cnn_labels(args.out, x)
    else:
        write_model(args.out, shapes, base, args.d_in, args.classes)
        x = rng.standard_normal((args.rows, args.d_in), dtype=np.float32)
        y = np.empty(args.rows, dtype=np.int64)
        for s in range(0, args.rows, 1024):
            y[s:s + 1024] = np.argmax(forward(base, x[s:s + 1024], hidden), axis=1)
    flip = rng.random(args.rows) < 0.15
    y[flip] = rng.integers(0, args.classes, int(flip.sum()))
    np.savez(os.path.join(args.out, "val.npz"), x=x, y=y)
    for r in val_rows:
        np.savez(os.path.join(args.out, f"val_{r}.npz"), x=x[:r], y=y[:r])

    # Checkpoints: θ_t = θ* + s_t·(r_t + e_t), r AR(1) with ρ = 0.7, s_t decaying.
    ckdir = os.path.join(args.out, "checkpoints")
    os.makedirs(ckdir, exist_ok=True)
    for f in os.listdir(ckdir):
        os.remove(os.path.join(ckdir, f))
    rho = np.float32(0.7)
    drift = {n: np.zeros(s, dtype=np.float32) for n, s, k in shapes if k != "int"}
    offset = {n: rng.standard_normal(s, dtype=np.float32) for n, s, k in shapes if k != "int"}
    scale = {}
    for name, shape, kind in shapes:
        if kind == "w":
            scale[name] = np.float32(np.sqrt(2.0 / fan_in(shape)))
        elif kind != "int":
            scale[name] = np.float32(0.05)
    width = max(3, len(str(args.n)))
    for t in range(1, args.n + 1):
        a_t = np.float32(args.offset * np.exp(-(t - 1) / max(args.n / args.decay, 1)))
        s_t = np.float32(args.noise)
        ck = {}
        for name, shape, kind in shapes:
            if kind == "int":
                ck[name] = np.array(100 * t, dtype=np.int64)
                continue
            d = drift[name]
            d *= rho
            d += np.float32(np.sqrt(1 - 0.49)) * rng.standard_normal(shape, dtype=np.float32)
            e = rng.standard_normal(shape, dtype=np.float32)
            e *= np.float32(args.iid)
            e += d
            e *= s_t
            e += a_t * offset[name]
            e *= scale[name]
            if kind == "v":  # running variances stay positive
                np.abs(e, out=e)
            e += base[name]
            ck[name] = e
        write_safetensors(os.path.join(ckdir, f"epoch_{t:0{width}d}.safetensors"), ck)
    for k in subsets:
        sub = os.path.join(args.out, f"checkpoints_{k}")
        os.makedirs(sub, exist_ok=True)
        for f in os.listdir(sub):
            os.remove(os.path.join(sub, f))
        for t in range(1, min(k, args.n) + 1):
            name = f"epoch_{t:0{width}d}.safetensors"
            os.symlink(os.path.join("..", "checkpoints", name), os.path.join(sub, name))
    with open(stamp_path, "w") as f:
        f.write(stamp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
