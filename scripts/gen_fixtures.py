#!/usr/bin/env python3
"""Regenerate every test fixture under fixtures/ (run from the repo root).

    python scripts/gen_fixtures.py            # everything
    python scripts/gen_fixtures.py digits kge # only some groups
    python scripts/gen_fixtures.py bn         # only the BatchNorm-recalibration fixtures

Requirements: torch (CPU), onnx, onnxruntime, onnxscript, safetensors, numpy,
scikit-learn (for its bundled `load_digits`, no download), ml_dtypes.

What it makes, and why:

fixtures/digits/
    A small MLP  fc1: Linear(64,64) -> bn: BatchNorm1d(64) -> ReLU -> fc2: Linear(64,10)
    trained on a deliberately tiny subset of scikit-learn's digits with a high
    learning rate, so validation accuracy fluctuates between epochs and the ASWA
    run exercises hard, soft and reject decisions.
    checkpoints/epoch_{1..15}.safetensors  state_dict after each epoch (NOT
        zero-padded: the tool must order epoch_2 before epoch_10). They contain
        BatchNorm's float running_mean/running_var and the int64 0-dim
        `bn.num_batches_tracked` (never averaged, absent from the ONNX graph).
    model.onnx + model.onnx.data  real `torch.onnx.export(dynamo=True,
        optimize=False)` export, dynamic batch, input `x` [batch,64] f32, output
        `logits` [batch,10]. torch's default puts the two weight matrices in the
        external-data file and keeps small tensors inline: a mixed model.
    inline/model.onnx  the same model with every initializer inline.
    val.npz (x f32 [437,64] in [0,1], y int64 [437]); val_compressed.npz (same
        arrays, np.savez_compressed); test.npz (disjoint, 437 rows).
        437 is not a multiple of 64 or 256: partial batches are exercised.
    expected/aswa_{accuracy,cross_entropy,accuracy_ties}.json and the final
        averaged weights expected/aswa_{accuracy,cross_entropy}.safetensors.

fixtures/digits_f16/, fixtures/digits_bf16/
    The same checkpoints with float tensors converted to float16 / bfloat16
    (`num_batches_tracked` stays int64). There is no model copy: use
    --model fixtures/digits/model.onnx --val fixtures/digits/val.npz (the ONNX
    initializers are f32; candidates are averaged in f64, rounded once to
    f16/bf16, then widened to f32 for scoring). Expected json + final weights.

fixtures/kge/
    A DistMult knowledge-graph embedding model (40 entities, 4 relations, dim 16)
    on a synthetic graph, 10 epoch checkpoints. ONNX inputs `h`, `r` int64
    [batch], output `scores` f32 [batch,40]. val.npz (h, r, y) and filter.npz
    (CSR indptr/indices: per val row the OTHER true tails of (h, r) in the whole
    graph). Expected: mrr with the filter, hits@3 without it.

fixtures/exports/
    Exports that the tool must reject (plus one that it must accept):
    cnn_checkpoints/epoch_{1,2}.safetensors  tiny CNN conv: Conv2d(1,4,3,p=1) ->
        bn: BatchNorm2d(4) -> ReLU -> flatten -> fc: Linear(256,10) on 8x8 digits.
    cnn.onnx          dynamo=True, optimize=False: BatchNormalization kept, names
                      equal the state_dict keys (positive control).
    fused_bn.onnx     dynamo=True, optimize=True: BN folded into the conv; the
                      initializers are STILL named conv.weight/conv.bias (but hold
                      fused values) and bn.* are gone; plus an int64 Reshape-shape
                      constant initializer.
    fused_bn_legacy.onnx  legacy exporter (dynamo=False, constant folding, eval):
                      BN folded into the conv, initializers renamed onnx::Conv_*.
    folded.onnx + folded_checkpoints/epoch_{1,2}.safetensors  legacy exporter
                      with constant folding on a model whose fc1 Linear is applied
                      to a 3-D input: fc1.weight is transposed and folded into an
                      `onnx::MatMul_*` initializer.
    val_images.npz    x f32 [101,1,8,8], y int64 [101] for the CNN.
    All export files here are saved with every initializer inline (single file).

fixtures/bn/ (+ fixtures/digits/calib.npz, fixtures/digits/expected/recal*)
    BatchNorm recalibration (`--recalibrate-bn CALIB.npz`), group `bn`, computed by
    scripts/reference_bn.py (torch's real update_bn, cross-checked against a
    float64 numpy forward pass). A CNN conv: Conv2d(1,4,3,p=1) -> bn1:
    BatchNorm2d(4) -> ReLU -> flatten -> drop: Dropout(0.2) -> fc1:
    Linear(256,32) -> bn2: BatchNorm1d(32) -> ReLU -> fc2: Linear(32,10) on 8x8
    digits (the dropout between the BatchNorms makes bn2's recalibrated stats
    depend on keeping it in eval mode), 6 epoch checkpoints, model.onnx(+.data),
    val.npz, calib.npz (200 rows, not a multiple of the calibration batch 64). Expected: epoch_3 and the
    mean of epochs 4-6 recalibrated, plain vs recalibrated accuracies, and ASWA
    with every scored candidate recalibrated (expected/recal.json,
    recal_*.safetensors, aswa_recal.safetensors); plain ASWA for contrast
    (expected/aswa_accuracy.json). For the digits MLP: calib.npz (300 training-
    pool rows) and epoch_5 recalibrated. `bn` runs after the other groups (and
    whenever `digits` runs, since that wipes fixtures/digits); alone:
    python scripts/gen_fixtures.py bn

The expected ASWA results are computed by scripts/reference_aswa.py (numpy +
onnxruntime, independent of the Rust code). Training is deterministic on CPU
(fixed seeds, one thread), but bit-exact reproduction across CPUs/torch versions
is not guaranteed: the committed files are the source of truth, and the
expectations can be recomputed from them with reference_aswa.py's CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference_aswa as ref  # noqa: E402

ROOT = os.path.dirname(HERE)
FIX = os.path.join(ROOT, "fixtures")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from safetensors.torch import save_file, load_file  # noqa: E402
import onnx  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning)
try:
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
except Exception:
    pass

N_VAL = 437
N_TEST = 437


def log(*a):
    print(*a, flush=True)


def fresh_dir(path):
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)


def rel(p):
    return os.path.relpath(p, ROOT)


def onnx_summary(path):
    m = onnx.load(path, load_external_data=False)
    inits = []
    for i in m.graph.initializer:
        ext = i.data_location == onnx.TensorProto.EXTERNAL
        inits.append((i.name, onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name, list(i.dims), "external" if ext else "inline"))
    init_names = {i.name for i in m.graph.initializer}

    def vi(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return (v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)

    return {
        "initializers": inits,
        "inputs": [vi(v) for v in m.graph.input if v.name not in init_names],
        "outputs": [vi(v) for v in m.graph.output],
        "ops": [n.op_type for n in m.graph.node],
        "opset": [(o.domain, o.version) for o in m.opset_import],
    }


def print_summary(path):
    s = onnx_summary(path)
    log(f"  {rel(path)}: opset {s['opset']}")
    log(f"    inputs  {s['inputs']}")
    log(f"    outputs {s['outputs']}")
    log(f"    ops     {s['ops']}")
    for i in s["initializers"]:
        log(f"    init    {i}")
    return s


def export_quiet(*args, **kw):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        return torch.onnx.export(*args, **kw)


def save_inline(src, dst):
    m = onnx.load(src, load_external_data=True)
    for t in m.graph.initializer:
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    onnx.save_model(m, dst, save_as_external_data=False)


def save_state(model, path):
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, path)


def run_ref(ckpt_dir, model, val, metric, out_json, out_weights=None, accept_ties=False, filt=None):
    result, final = ref.run_aswa(ckpt_dir, model, val, metric, accept_ties=accept_ties, filter_path=filt)
    ref.write_json(out_json, result)
    if out_weights:
        ref.write_safetensors(out_weights, final)
        # the safetensors library must read our writer's output back unchanged
        back = load_file(out_weights)
        for k, v in final.items():
            tb = back[k]
            if v.dtype == ref.BF16:
                same = np.array_equal(tb.view(torch.int16).numpy().view(np.uint16), v.view(np.uint16))
            else:
                same = np.array_equal(tb.numpy(), v)
            assert same, k
    dec = " ".join(s["decision"] for s in result["steps"])
    log(f"  {rel(out_json)}: {dec}  -> members {result['members']} val_score={result['val_score']:.6f}")
    return result, final


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.bn = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def digits_split():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(20240601).permutation(len(y))
    val = perm[:N_VAL]
    test = perm[N_VAL : N_VAL + N_TEST]
    train_pool = perm[N_VAL + N_TEST :]
    return x, y, val, test, train_pool


DIGITS = dict(n_train=100, epochs=15, lr=0.1, momentum=0.9, batch=10, seed=2, noise=0.3)


def gen_digits():
    log("== digits")
    out = os.path.join(FIX, "digits")
    fresh_dir(out)
    ck = os.path.join(out, "checkpoints")
    os.makedirs(ck)
    x, y, val, test, pool = digits_split()
    np.savez(os.path.join(out, "val.npz"), x=x[val], y=y[val])
    np.savez_compressed(os.path.join(out, "val_compressed.npz"), x=x[val], y=y[val])
    np.savez(os.path.join(out, "test.npz"), x=x[test], y=y[test])

    p = DIGITS
    torch.manual_seed(p["seed"])
    g = torch.Generator().manual_seed(p["seed"])
    tr = pool[: p["n_train"]]
    xt = torch.from_numpy(x[tr])
    yt = torch.from_numpy(y[tr])
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"])
    xv = torch.from_numpy(x[val])
    for ep in range(1, p["epochs"] + 1):
        model.train()
        order = torch.randperm(len(tr), generator=g)
        for s in range(0, len(tr), p["batch"]):
            idx = order[s : s + p["batch"]]
            xb = xt[idx] + p["noise"] * torch.randn(len(idx), 64, generator=g)
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_state(model, os.path.join(ck, f"epoch_{ep}.safetensors"))
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1).numpy() == y[val]).mean()
        log(f"  epoch {ep:2d} train loss {loss.item():.4f} val acc {acc:.4f}")

    # real export, eval mode, torch defaults for external data
    model.eval()
    sd_keys = list(model.state_dict().keys())
    mpath = os.path.join(out, "model.onnx")
    export_quiet(model, (torch.from_numpy(x[val[:5]]),), mpath, dynamo=True, optimize=False,
                 input_names=["x"], output_names=["logits"],
                 dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    s = print_summary(mpath)
    names = [i[0] for i in s["initializers"]]
    float_keys = [k for k in sd_keys if model.state_dict()[k].is_floating_point()]
    assert sorted(names) == sorted(float_keys), (names, float_keys)
    log(f"  state_dict keys {sd_keys}")
    log(f"  initializer names == float state_dict keys: OK; files {sorted(os.listdir(out))}")
    os.makedirs(os.path.join(out, "inline"))
    save_inline(mpath, os.path.join(out, "inline", "model.onnx"))
    # The same network exported with a fixed batch dimension of 100 (no dynamic_shapes):
    # 437 validation rows then need a padded last batch.
    os.makedirs(os.path.join(out, "fixed_batch"))
    tmp_fixed = os.path.join(out, "fixed_batch", "tmp.onnx")
    export_quiet(model, (torch.from_numpy(x[val[:100]]),), tmp_fixed, dynamo=True, optimize=False,
                 input_names=["x"], output_names=["logits"])
    save_inline(tmp_fixed, os.path.join(out, "fixed_batch", "model.onnx"))
    for f in os.listdir(os.path.join(out, "fixed_batch")):
        if f != "model.onnx":
            os.remove(os.path.join(out, "fixed_batch", f))

    # the exported graph reproduces torch on the validation set
    import onnxruntime as ort

    sess = ort.InferenceSession(mpath, providers=["CPUExecutionProvider"])
    o = sess.run(["logits"], {"x": x[val]})[0]
    with torch.no_grad():
        t = model(torch.from_numpy(x[val])).numpy()
    log(f"  onnx vs torch max |diff| {np.abs(o - t).max():.3g}")

    # our safetensors reader agrees with the library
    for f in os.listdir(ck):
        a = ref.read_safetensors(os.path.join(ck, f))
        b = load_file(os.path.join(ck, f))
        assert set(a) == set(b) and all(np.array_equal(a[k][1], b[k].numpy()) for k in a), f

    ex = os.path.join(out, "expected")
    os.makedirs(ex)
    v = os.path.join(out, "val.npz")
    res = {}
    res["accuracy"] = run_ref(ck, mpath, v, "accuracy", os.path.join(ex, "aswa_accuracy.json"),
                              os.path.join(ex, "aswa_accuracy.safetensors"))[0]
    res["cross-entropy"] = run_ref(ck, mpath, v, "cross-entropy", os.path.join(ex, "aswa_cross_entropy.json"),
                                   os.path.join(ex, "aswa_cross_entropy.safetensors"))[0]
    res["ties"] = run_ref(ck, mpath, v, "accuracy", os.path.join(ex, "aswa_accuracy_ties.json"), accept_ties=True)[0]
    decs = {s["decision"] for s in res["accuracy"]["steps"]}
    assert {"hard", "soft", "reject"} <= decs, f"accuracy run lacks a decision kind: {decs}"
    return res


def gen_digits_lowp():
    import ml_dtypes

    res = {}
    src = os.path.join(FIX, "digits", "checkpoints")
    mpath = os.path.join(FIX, "digits", "model.onnx")
    v = os.path.join(FIX, "digits", "val.npz")
    for tag, tdt in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        log(f"== digits_{tag}")
        out = os.path.join(FIX, f"digits_{tag}")
        fresh_dir(out)
        ck = os.path.join(out, "checkpoints")
        os.makedirs(ck)
        for f in sorted(os.listdir(src)):
            sd = load_file(os.path.join(src, f))
            sd = {k: (t.to(tdt) if t.is_floating_point() else t) for k, t in sd.items()}
            save_file(sd, os.path.join(ck, f))
        ex = os.path.join(out, "expected")
        os.makedirs(ex)
        r, final = run_ref(ck, mpath, v, "accuracy", os.path.join(ex, "aswa_accuracy.json"),
                           os.path.join(ex, "aswa_accuracy.safetensors"))
        r2, _ = run_ref(ck, mpath, v, "cross-entropy", os.path.join(ex, "aswa_cross_entropy.json"))
        res[tag] = (r, r2)
        # how many final-weight elements would differ with the (wrong) double
        # rounding f64 -> f32 -> f16/bf16?  Informational only.
        names = r["members"]
        cks = [ref.read_safetensors(os.path.join(ck, n)) for n in names]
        diff = total = 0
        for k, (st, _) in cks[0].items():
            if st not in ref.FLOAT_ST:
                continue
            acc = sum(c[k][1].astype(np.float64) for c in cks) / len(cks)
            dr = acc.astype(np.float32).astype(np.float16 if tag == "f16" else ml_dtypes.bfloat16)
            diff += int(np.sum(dr.view(np.uint16) != final[k].view(np.uint16)))
            total += acc.size
        log(f"  double-rounding (f64->f32->{tag}) would change {diff}/{total} final elements")
    return res


# ---------------------------------------------------------------------------
# kge
# ---------------------------------------------------------------------------


class DistMult(nn.Module):
    def __init__(self, n_ent, n_rel, dim):
        super().__init__()
        self.ent = nn.Embedding(n_ent, dim)
        self.rel = nn.Embedding(n_rel, dim)
        nn.init.normal_(self.ent.weight, std=0.3)
        nn.init.normal_(self.rel.weight, std=0.3)

    def forward(self, h, r):
        return (self.ent(h) * self.rel(r)) @ self.ent.weight.t()


KGE = dict(n_ent=40, n_rel=4, dim=16, epochs=10, lr=0.03, batch=32, seed=7, n_val=53)


def kge_graph(p):
    rng = np.random.default_rng(p["seed"])
    n = p["n_ent"]
    triples = set()
    for r in range(p["n_rel"]):
        # symmetric-ish relation: entities fall into clusters; tails are other
        # members of the head's cluster (learnable by DistMult) plus noise
        n_clusters = [5, 8, 4, 10][r % 4]
        cl = rng.integers(0, n_clusters, size=n)
        for h in range(n):
            if rng.random() < 0.35:
                continue
            same = np.flatnonzero((cl == cl[h]) & (np.arange(n) != h))
            k = min(len(same), int(rng.integers(1, 4)))
            for t in rng.choice(same, size=k, replace=False) if k else []:
                triples.add((h, r, int(t)))
            if rng.random() < 0.15:
                triples.add((h, r, int(rng.integers(0, n))))
    return np.array(sorted(triples), dtype=np.int64)


def gen_kge():
    log("== kge")
    p = KGE
    out = os.path.join(FIX, "kge")
    fresh_dir(out)
    ck = os.path.join(out, "checkpoints")
    os.makedirs(ck)
    trip = kge_graph(p)
    rng = np.random.default_rng(p["seed"] + 1)
    perm = rng.permutation(len(trip))
    val = trip[np.sort(perm[: p["n_val"]])]
    train = trip[perm[p["n_val"] :]]
    log(f"  {len(trip)} triples, {len(train)} train, {len(val)} val")
    np.savez(os.path.join(out, "val.npz"), h=val[:, 0], r=val[:, 1], y=val[:, 2])
    allt = {}
    for h, r, t in trip:
        allt.setdefault((int(h), int(r)), set()).add(int(t))
    indptr = [0]
    indices = []
    for h, r, t in val:
        others = sorted(allt[(int(h), int(r))] - {int(t)})
        indices += others
        indptr.append(len(indices))
    np.savez(os.path.join(out, "filter.npz"), indptr=np.array(indptr, dtype=np.int64),
             indices=np.array(indices, dtype=np.int64))
    log(f"  filter: {len(indices)} excluded entries over {len(val)} rows")

    torch.manual_seed(p["seed"])
    g = torch.Generator().manual_seed(p["seed"])
    model = DistMult(p["n_ent"], p["n_rel"], p["dim"])
    opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
    # 1-N training with multi-label targets from the training triples
    keys = sorted({(int(h), int(r)) for h, r, _ in train})
    tgt = torch.zeros(len(keys), p["n_ent"])
    kidx = {k: i for i, k in enumerate(keys)}
    for h, r, t in train:
        tgt[kidx[(int(h), int(r))], int(t)] = 1.0
    hk = torch.tensor([k[0] for k in keys])
    rk = torch.tensor([k[1] for k in keys])
    for ep in range(1, p["epochs"] + 1):
        order = torch.randperm(len(keys), generator=g)
        for s in range(0, len(keys), p["batch"]):
            i = order[s : s + p["batch"]]
            loss = nn.functional.binary_cross_entropy_with_logits(model(hk[i], rk[i]), tgt[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_state(model, os.path.join(ck, f"epoch_{ep}.safetensors"))
        with torch.no_grad():
            sc = model(torch.from_numpy(val[:, 0]), torch.from_numpy(val[:, 1])).numpy()
        m = ref.compute_metric("mrr", sc, val[:, 2], (np.array(indptr), np.array(indices)))
        log(f"  epoch {ep:2d} loss {loss.item():.4f} filtered val mrr {m:.4f}")

    model.eval()
    mpath = os.path.join(out, "model.onnx")
    b = torch.export.Dim("batch")
    export_quiet(model, (torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3])), mpath, dynamo=True, optimize=False,
                 input_names=["h", "r"], output_names=["scores"], dynamic_shapes={"h": {0: b}, "r": {0: b}})
    s = print_summary(mpath)
    names = sorted(i[0] for i in s["initializers"])
    assert names == sorted(model.state_dict()), names
    log(f"  files {sorted(os.listdir(out))}")
    ex = os.path.join(out, "expected")
    os.makedirs(ex)
    v = os.path.join(out, "val.npz")
    res = {}
    res["mrr"] = run_ref(ck, mpath, v, "mrr", os.path.join(ex, "aswa_mrr_filtered.json"),
                         os.path.join(ex, "aswa_mrr_filtered.safetensors"), filt=os.path.join(out, "filter.npz"))[0]
    res["hits@3"] = run_ref(ck, mpath, v, "hits@3", os.path.join(ex, "aswa_hits3.json"))[0]
    return res


# ---------------------------------------------------------------------------
# broken exports
# ---------------------------------------------------------------------------


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


class Rows(nn.Module):
    """Linear applied to a 3-D tensor: the legacy exporter folds W^T into onnx::MatMul_*."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x.reshape(-1, 8, 8)))
        return self.fc2(h.reshape(h.shape[0], -1))


def _train_small(model, x, y, ck, epochs, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for ep in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 16):
            i = order[s : s + 16]
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_state(model, os.path.join(ck, f"epoch_{ep}.safetensors"))
    model.eval()


def gen_exports():
    log("== exports")
    out = os.path.join(FIX, "exports")
    fresh_dir(out)
    x, y, val, test, pool = digits_split()
    tr = pool[:200]
    xi = torch.from_numpy(x[tr].reshape(-1, 1, 8, 8))
    yt = torch.from_numpy(y[tr])
    np.savez(os.path.join(out, "val_images.npz"), x=x[val[:101]].reshape(-1, 1, 8, 8), y=y[val[:101]])
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(11)
        cnn = CNN()
        ck = os.path.join(out, "cnn_checkpoints")
        os.makedirs(ck)
        _train_small(cnn, xi, yt, ck, 2, 11)
        dummy = (torch.from_numpy(x[val[:5]].reshape(-1, 1, 8, 8)),)
        dyn = {"x": {0: torch.export.Dim("batch")}}
        for name, kw in (("cnn", dict(dynamo=True, optimize=False, dynamic_shapes=dyn)),
                         ("fused_bn", dict(dynamo=True, optimize=True, dynamic_shapes=dyn)),
                         ("fused_bn_legacy", dict(dynamo=False, do_constant_folding=True,
                                                  training=torch.onnx.TrainingMode.EVAL,
                                                  dynamic_axes={"x": {0: "batch"}}))):
            tp = os.path.join(tmp, name + ".onnx")
            export_quiet(cnn, dummy, tp, input_names=["x"], output_names=["logits"], **kw)
            save_inline(tp, os.path.join(out, name + ".onnx"))
            res[name] = print_summary(os.path.join(out, name + ".onnx"))

        torch.manual_seed(12)
        rows = Rows()
        ck2 = os.path.join(out, "folded_checkpoints")
        os.makedirs(ck2)
        _train_small(rows, torch.from_numpy(x[tr]), yt, ck2, 2, 12)
        tp = os.path.join(tmp, "folded.onnx")
        export_quiet(rows, (torch.from_numpy(x[val[:5]]),), tp, dynamo=False, do_constant_folding=True,
                     input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}})
        save_inline(tp, os.path.join(out, "folded.onnx"))
        res["folded"] = print_summary(os.path.join(out, "folded.onnx"))
    # positive control scores with the reference
    r, _ = ref.run_aswa(ck, os.path.join(out, "cnn.onnx"), os.path.join(out, "val_images.npz"), "accuracy")
    log(f"  cnn.onnx reference run: {[s['decision'] for s in r['steps']]} val_score={r['val_score']:.4f}")
    return res


# ---------------------------------------------------------------------------
# selection strategies (reference_strategies.py)
# ---------------------------------------------------------------------------

STRATEGY_PARAMS = dict(swa_start_at=10, swa_every=2, last=4, ema_decay=0.5, k=3, strict=True)
STRATEGY_PARAMS_SET = ["swa", "uniform", "ema", "top-k", "greedy-soup"]


def run_strategies_ref(ck, out_json, weights_dir, **kw):
    import reference_strategies as rstrat

    mpath = os.path.join(FIX, "digits", "model.onnx")
    v = os.path.join(FIX, "digits", "val.npz")
    t = os.path.join(FIX, "digits", "test.npz")
    result, weights = rstrat.run_strategies(ck, mpath, v, t, "accuracy", **kw)
    ref.write_json(out_json, result)
    fresh_dir(weights_dir)
    for s, w in weights.items():
        p = os.path.join(weights_dir, f"{s}.safetensors")
        ref.write_safetensors(p, w)
        back = load_file(p)  # the safetensors library reads our writer's output back unchanged
        for k, a in w.items():
            tb = back[k]
            if a.dtype == ref.BF16:
                same = np.array_equal(tb.view(torch.int16).numpy().view(np.uint16), a.view(np.uint16))
            else:
                same = np.array_equal(tb.numpy(), a)
            assert same, (p, k)
    log(f"  {rel(out_json)} (+ {rel(weights_dir)}/)")
    for s, r in result["strategies"].items():
        log(f"    {s:>12s}: {[m.replace('.safetensors', '') for m in r['members']]} "
            f"val={r['val_score']:.6f} test={r['test_score']:.6f}")
    return result


def gen_strategies():
    log("== strategies")
    res = {}
    ex = os.path.join(FIX, "digits", "expected")
    ck = os.path.join(FIX, "digits", "checkpoints")
    res["digits"] = run_strategies_ref(ck, os.path.join(ex, "strategies_accuracy.json"),
                                       os.path.join(ex, "strategies"))
    res["digits_params"] = run_strategies_ref(ck, os.path.join(ex, "strategies_params.json"),
                                              os.path.join(ex, "strategies_params"),
                                              strategies=STRATEGY_PARAMS_SET, **STRATEGY_PARAMS)
    exb = os.path.join(FIX, "digits_bf16", "expected")
    res["bf16"] = run_strategies_ref(os.path.join(FIX, "digits_bf16", "checkpoints"),
                                     os.path.join(exb, "strategies_accuracy.json"), os.path.join(exb, "strategies"))
    # the fixture should tell the variants apart
    d, p = res["digits"]["strategies"], res["digits_params"]["strategies"]
    for s in STRATEGY_PARAMS_SET:
        assert d[s]["members"] != p[s]["members"] or s == "ema", f"{s}: params do not change the members"
    assert d["ema"]["val_score"] != p["ema"]["val_score"] or d["ema"]["test_score"] != p["ema"]["test_score"]
    return res


# ---------------------------------------------------------------------------
# BatchNorm recalibration (reference_bn.py)
# ---------------------------------------------------------------------------

BN = dict(n_train=600, epochs=6, lr=0.05, momentum=0.9, batch=32, seed=9, n_calib=200, calib_batch=64)
DIGITS_CALIB_ROWS = 300


def _st(path):
    return {k: v for k, (_, v) in ref.read_safetensors(path).items()}


def _write_checked(path, tensors):
    ref.write_safetensors(path, tensors)
    back = load_file(path)  # the safetensors library reads our writer's output back unchanged
    assert set(back) == set(tensors)
    for k, a in tensors.items():
        assert back[k].numpy().dtype == a.dtype and np.array_equal(back[k].numpy(), a), (path, k)


def _bn_nodes(mpath):
    """[(node name, [input names], {attr: value})] of the BatchNormalization nodes."""
    m = onnx.load(mpath, load_external_data=False)
    out = []
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            out.append((n.name, list(n.input), {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}))
    return out


def gen_bn():
    """BatchNorm recalibration fixtures: fixtures/digits/{calib.npz, expected/recal*} and fixtures/bn/."""
    import onnxruntime as ort
    import reference_bn as rbn

    log("== bn")
    p = BN
    B = p["calib_batch"]
    x, y, val, test, pool = digits_split()
    diffs = []  # (max abs, max scaled) torch-vs-numpy per recalibration
    margins = []  # smallest top-1/top-2 logit gap of every recalibrated candidate scored

    # -- digits MLP (BatchNorm1d): calibration rows from the training pool ----
    d = os.path.join(FIX, "digits")
    cal_idx = pool[:DIGITS_CALIB_ROWS]  # the first 100 are the MLP's training rows
    assert not (set(cal_idx) & (set(val) | set(test)))
    x_cal = x[cal_idx]
    np.savez(os.path.join(d, "calib.npz"), x=x_cal)
    assert sorted(MLP().state_dict()) == sorted(rbn.DigitsMLP().state_dict())
    ex = os.path.join(d, "expected")
    os.makedirs(ex, exist_ok=True)
    sc = ref.Scorer(os.path.join(d, "model.onnx"), os.path.join(d, "val.npz"), "accuracy")
    cand = _st(os.path.join(d, "checkpoints", "epoch_5.safetensors"))
    st = rbn.recalibrate(MLP, cand, x_cal, B)  # torch update_bn on the generator's own MLP class
    npst = rbn.numpy_recalibrate("digits_mlp", cand, x_cal, B)
    diffs.append((rbn.max_abs_diff(st, npst), rbn.max_scaled_diff(st, npst)))
    assert diffs[-1][1] <= 1e-6, diffs[-1]
    new = rbn.recalibrated_state(MLP, cand, x_cal, B, st)
    _write_checked(os.path.join(ex, "recal_epoch_5.safetensors"), new)
    out_r = sc.outputs(new)
    margins.append(rbn.min_margin(out_r))
    plain, recal = sc.score(cand), ref.compute_metric("accuracy", out_r, sc.val["y"])
    assert plain != recal
    res_d = {"batch_size": B, "calib_rows": len(x_cal), "calib_batches": -(-len(x_cal) // B), "metric": "accuracy",
             "val": {"epoch_5": {"plain": plain, "recalibrated": recal}}}
    ref.write_json(os.path.join(ex, "recal.json"), res_d)
    log(f"  digits/calib.npz x {x_cal.shape}; epoch_5 accuracy plain {plain:.6f} -> recalibrated {recal:.6f}")

    # -- CNN with BatchNorm2d + BatchNorm1d + Dropout ---------------------------
    out = os.path.join(FIX, "bn")
    fresh_dir(out)
    ck = os.path.join(out, "checkpoints")
    os.makedirs(ck)
    tr = pool[: p["n_train"]]
    cal = pool[: p["n_calib"]]  # a sample of the training rows; 200 = 3 * 64 + 8: partial last batch
    assert len(cal) % B != 0
    img = x.reshape(-1, 1, 8, 8)
    np.savez(os.path.join(out, "val.npz"), x=img[val], y=y[val])
    np.savez(os.path.join(out, "calib.npz"), x=img[cal])
    xi, yt, xv = torch.from_numpy(img[tr]), torch.from_numpy(y[tr]), torch.from_numpy(img[val])
    torch.manual_seed(p["seed"])
    g = torch.Generator().manual_seed(p["seed"])
    model = rbn.BnCNN()
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"])
    for ep in range(1, p["epochs"] + 1):
        model.train()  # dropout active while training
        order = torch.randperm(len(tr), generator=g)
        for s in range(0, len(tr), p["batch"]):
            i = order[s : s + p["batch"]]
            loss = nn.functional.cross_entropy(model(xi[i]), yt[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_state(model, os.path.join(ck, f"epoch_{ep}.safetensors"))
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1).numpy() == y[val]).mean()
        log(f"  epoch {ep} train loss {loss.item():.4f} val acc {acc:.4f}")

    model.eval()
    mpath = os.path.join(out, "model.onnx")
    export_quiet(model, (xv[:5],), mpath, dynamo=True, optimize=False, input_names=["x"], output_names=["logits"],
                 dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    s = print_summary(mpath)
    sd = model.state_dict()
    names = [i[0] for i in s["initializers"]]
    assert sorted(names) == sorted(k for k in sd if sd[k].is_floating_point()), names
    bns = _bn_nodes(mpath)
    stat_names = rbn.bn_stat_names(model)
    assert len(bns) == 2, bns
    for (nname, inputs, attrs), bn in zip(bns, ("bn1", "bn2")):
        assert inputs[1:5] == [f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean", f"{bn}.running_var"], inputs
        assert abs(attrs.get("epsilon", 1e-5) - rbn.BN_EPS) < 1e-12 and attrs.get("training_mode", 0) == 0, attrs
        log(f"  BatchNormalization {nname}: inputs {inputs} attrs {attrs}")
    log(f"  Dropout node in the eval-mode export: {'Dropout' in s['ops']}")
    sess = ort.InferenceSession(mpath, providers=["CPUExecutionProvider"])
    o = sess.run(["logits"], {"x": img[val]})[0]
    with torch.no_grad():
        t = model(xv).numpy()
    log(f"  onnx vs torch max |diff| {np.abs(o - t).max():.3g}; BN stats {stat_names}")
    log(f"  files {sorted(os.listdir(out))}")

    ex = os.path.join(out, "expected")
    os.makedirs(ex)
    v = os.path.join(out, "val.npz")
    x_cal = img[cal]
    sc = ref.Scorer(mpath, v, "accuracy")

    def recal_with(stats_fn):
        def f(tensors):
            return rbn.recalibrated_state(rbn.BnCNN, tensors, x_cal, B, stats_fn(tensors))
        return f

    recal = recal_with(lambda t: rbn.checked_recalibrate("bn_cnn", t, x_cal, B, record=diffs))
    # the same, with the float64 numpy stats (rounded to f32) instead of torch's: must score identically
    recal_np = recal_with(lambda t: rbn.numpy_recalibrate("bn_cnn", t, x_cal, B))

    # the fixture tells "dropout in eval" apart from a plain update_bn (whole model in train mode)
    from torch.utils.data import DataLoader, TensorDataset

    m3 = rbn.BnCNN()
    m3.load_state_dict(load_file(os.path.join(ck, "epoch_3.safetensors")))
    torch.manual_seed(0)
    torch.optim.swa_utils.update_bn(DataLoader(TensorDataset(torch.from_numpy(x_cal)), batch_size=B), m3)
    st3 = rbn.recalibrate(rbn.BnCNN, _st(os.path.join(ck, "epoch_3.safetensors")), x_cal, B)
    m3sd = m3.state_dict()
    log("  plain update_bn (dropout in train mode) vs dropout in eval, epoch_3: max |diff| "
        + ", ".join(f"{k} {np.abs(m3sd[k].numpy() - v).max():.3g}" for k, v in st3.items()))
    for k in ("bn1.running_mean", "bn1.running_var"):  # before the dropout: the same
        assert np.array_equal(m3sd[k].numpy(), st3[k]), k
    for k in ("bn2.running_mean", "bn2.running_var"):  # after it: a train-mode dropout changes them
        assert np.abs(m3sd[k].numpy() - st3[k]).max() > 1e-3, k

    cks = [ref.read_safetensors(os.path.join(ck, f"epoch_{e}.safetensors")) for e in range(1, p["epochs"] + 1)]
    res = {"batch_size": B, "calib_rows": len(cal), "calib_batches": -(-len(cal) // B), "metric": "accuracy", "val": {}}
    for key, fname, members in (("epoch_3", "recal_epoch_3", [2]), ("mean_4_6", "recal_mean_4_6", [3, 4, 5])):
        cand = ref.average(cks, members)  # one member: the checkpoint itself
        new = recal(cand)
        _write_checked(os.path.join(ex, fname + ".safetensors"), new)
        out_r = sc.outputs(new)
        margins.append(rbn.min_margin(out_r))
        plain, rec = sc.score(cand), ref.compute_metric("accuracy", out_r, sc.val["y"])
        assert sc.score(recal_np(cand)) == rec
        assert plain != rec, key
        changed = [k for k in new if not np.array_equal(new[k], cand[k])]
        assert sorted(changed) == sorted(stat_names), changed
        res["val"][key] = {"plain": plain, "recalibrated": rec}
        log(f"  {key}: accuracy plain {plain:.6f} -> recalibrated {rec:.6f}")

    aswa, final = rbn.run_aswa_recal(ck, mpath, v, recal, margins=margins)
    aswa_np, final_np = rbn.run_aswa_recal(ck, mpath, v, recal_np)
    assert aswa_np == aswa, "ASWA decisions/scores depend on torch-vs-numpy stat noise"
    res["aswa"] = {k: aswa[k] for k in ("metric", "higher_is_better", "accept_ties", "recalibrated", "checkpoints",
                                        "steps", "members", "val_score")}
    _write_checked(os.path.join(ex, "aswa_recal.safetensors"), final)
    ref.write_json(os.path.join(ex, "recal.json"), res)
    log(f"  aswa with recalibration: {' '.join(s['decision'] for s in aswa['steps'])} -> members {aswa['members']} "
        f"val_score={aswa['val_score']:.6f}")
    plain_aswa, _ = run_ref(ck, mpath, v, "accuracy", os.path.join(ex, "aswa_accuracy.json"))
    assert [s["decision"] for s in plain_aswa["steps"]] != [s["decision"] for s in aswa["steps"]]
    log(f"  torch vs numpy BN stats: max |diff| {max(a for a, _ in diffs):.3g}, "
        f"max |diff|/max(1,|stat|) {max(r for _, r in diffs):.3g} over {len(diffs)} recalibrations")
    log(f"  smallest top-1/top-2 logit margin of a recalibrated candidate: {min(margins):.3g}")
    return {"digits": res_d, "bn": res, "plain_aswa": plain_aswa}


# ---------------------------------------------------------------------------

README_HEAD = """# Test fixtures

Everything in this directory is generated by

    python scripts/gen_fixtures.py            # from the repo root; ~15 s on 2 CPU cores (+ ~20 s for `bn`)
    python scripts/gen_fixtures.py bn         # only the BatchNorm-recalibration fixtures

(torch CPU, onnx, onnxruntime 1.31, onnxscript, safetensors, numpy, scikit-learn,
ml_dtypes). The expected results are computed by the independent Python reference
`scripts/reference_aswa.py` (numpy + onnxruntime; shares no code with the Rust
tool). Training is seeded and single-threaded, but bit-exact regeneration on a
different CPU / torch version is not guaranteed, so the committed files are the
source of truth; re-derive any expectation from them with, e.g.

    python scripts/reference_aswa.py fixtures/digits/checkpoints \\
        --model fixtures/digits/model.onnx --val fixtures/digits/val.npz \\
        --metric accuracy --out fixtures/digits/expected/aswa_accuracy.json \\
        --out-weights fixtures/digits/expected/aswa_accuracy.safetensors

Expected JSON fields: `metric`, `higher_is_better`, `accept_ties`, `checkpoints`
(names relative to the checkpoint dir, in processing order = natural sort),
`steps[]` = {`checkpoint`, `running_score` (v_t, the checkpoint's own score), `ensemble_score` (v_A after the step),
`lookahead_score` (v_P, null for init), `decision` (init/hard/soft/reject),
`members` (ensemble size after the step)}, `members` (final ensemble), `val_score`
(final v_A). Expected `.safetensors` hold the final averaged weights: float
tensors = mean of the members computed in float64 and rounded once (nearest even)
to the checkpoint dtype; integer tensors copied from the newest member.
Scores are exact in float64 for accuracy/hits (multiples of 1/n); compare
cross-entropy/mrr with a small tolerance (1e-6 is ample: the closest
decision-relevant gap in these fixtures is ~2e-4, and decisions are unchanged
under 1e-5 relative noise on the model outputs).

## Layout

| path | what |
|---|---|
| `digits/checkpoints/epoch_{1..15}.safetensors` | MLP `fc1` Linear(64,64) -> `bn` BatchNorm1d(64) -> ReLU -> `fc2` Linear(64,10), state_dict after each epoch (f32 + int64 0-dim `bn.num_batches_tracked`); names not zero-padded (natural order epoch_2 < epoch_10) |
| `digits/model.onnx` + `model.onnx.data` | `torch.onnx.export(dynamo=True, optimize=False)`, eval mode, dynamic batch; torch's default external data: `fc1.weight` and `fc2.weight` in `model.onnx.data`, the rest inline |
| `digits/inline/model.onnx` | the same model, all initializers inline |
| `digits/fixed_batch/model.onnx` | the same model exported with a fixed batch dimension of 100 (all inline) |
| `digits/val.npz`, `val_compressed.npz`, `test.npz` | `x` f32 [437,64] in [0,1], `y` int64 [437]; val_compressed = same arrays via `np.savez_compressed`; test is disjoint |
| `digits/expected/` | `aswa_accuracy.json`+`.safetensors`, `aswa_cross_entropy.json`+`.safetensors`, `aswa_accuracy_ties.json` (`--accept-ties`) |
| `digits/calib.npz` | `x` f32 [300,64]: BatchNorm calibration rows (the first 300 rows of the digits training pool; the first 100 of them are the MLP's training rows; disjoint from val/test) |
| `digits/expected/recal_epoch_5.safetensors`, `recal.json` | epoch_5 with `bn.running_mean`/`bn.running_var` recalibrated on `digits/calib.npz` (batch 64); plain vs recalibrated accuracy (see "BatchNorm recalibration") |
| `digits/expected/strategies_accuracy.json` + `strategies/<strategy>.safetensors` | all eight selection strategies, default parameters, accuracy, with test scores (see "Selection strategies") |
| `digits/expected/strategies_params.json` + `strategies_params/<strategy>.safetensors` | swa, uniform, ema, top-k, greedy-soup with non-default parameters |
| `digits_f16/checkpoints/`, `digits_bf16/checkpoints/` | the digits checkpoints with float tensors cast to F16 / BF16 (`num_batches_tracked` stays I64). No model copy: use `--model fixtures/digits/model.onnx --val fixtures/digits/val.npz` |
| `digits_f16/half/folded.onnx`, `unfolded.onnx` | the digits MLP in epoch_15's float16 state as a float16 model (`model.half()`), by `scripts/gen_legacy_exports.py`: torch's default export (BatchNorm folded into `fc1` in float16) and `dynamo=True, optimize=False` |
| `digits_{f16,bf16}/expected/` | `aswa_accuracy.json`+`.safetensors` (final weights in F16/BF16), `aswa_cross_entropy.json` |
| `digits_bf16/expected/strategies_accuracy.json` + `strategies/<strategy>.safetensors` | the eight strategies on the BF16 checkpoints (BF16 weights, rounded once from float64) |
| `kge/checkpoints/epoch_{1..10}.safetensors` | DistMult, `ent.weight` [40,16], `rel.weight` [4,16] |
| `kge/model.onnx` + `model.onnx.data` | inputs `h`, `r` int64 [batch], output `scores` f32 [batch,40]; `ent.weight` external, `rel.weight` inline |
| `kge/legacy/model.onnx` | the DistMult model in epoch_10's state exported by the legacy exporter (`scripts/gen_legacy_exports.py`): `ent.weight`, `rel.weight` and `onnx::MatMul_9` = `ent.weight` transposed (constant folding of `@ E.t()`) |
| `kge/val.npz`, `kge/filter.npz` | `h`,`r`,`y` int64 [53]; CSR `indptr` int64 [54], `indices` int64: the other true tails of (h,r) in the whole graph (y excluded) |
| `kge/expected/` | `aswa_mrr_filtered.json`+`.safetensors` (`--metric mrr --filter kge/filter.npz`), `aswa_hits3.json` (`--metric hits@3`, no filter) |
| `exports/cnn_checkpoints/epoch_{1,2}.safetensors` | tiny CNN `conv` Conv2d(1,4,3,p=1) -> `bn` BatchNorm2d(4) -> ReLU -> flatten -> `fc` Linear(256,10) |
| `exports/cnn.onnx` | dynamo=True, optimize=False: good export (positive control) |
| `exports/fused_bn.onnx` | dynamo=True, optimize=True: BN fused into the conv but names kept (`conv.weight`/`conv.bias` hold FUSED values), `bn.*` absent, plus an int64 shape initializer |
| `exports/fused_bn_legacy.onnx` | legacy exporter, constant folding: BN fused, conv params renamed `onnx::Conv_*` (scored folded) |
| `exports/folded.onnx` + `folded_checkpoints/epoch_{1,2}.safetensors` | legacy exporter, constant folding, `fc1` Linear(8,16) applied to a 3-D input: `fc1.weight` folded/transposed into `onnx::MatMul_*` [8,16] |
| `exports/val_images.npz` | `x` f32 [101,1,8,8], `y` int64 [101] (first 101 digits val rows) |
| `bn/checkpoints/epoch_{1..6}.safetensors` | CNN `conv` Conv2d(1,4,3,p=1) -> `bn1` BatchNorm2d(4) -> ReLU -> flatten -> `drop` Dropout(0.2) -> `fc1` Linear(256,32) -> `bn2` BatchNorm1d(32) -> ReLU -> `fc2` Linear(32,10), f32 + int64 0-dim `bn{1,2}.num_batches_tracked`. The dropout sits between the BatchNorms: `bn2`'s recalibrated stats depend on it being in eval mode |
| `bn/model.onnx` + `model.onnx.data` | dynamo=True, optimize=False, eval mode (no Dropout node), dynamic batch, opset 20; two `BatchNormalization` nodes (epsilon 1e-5, momentum 0.9, training_mode absent = 0) reading `bn{1,2}.{weight,bias,running_mean,running_var}`; `fc1.weight`, `fc2.weight` external |
| `bn/val.npz`, `bn/calib.npz` | val: `x` f32 [437,1,8,8], `y` int64 [437] (the digits val rows); calib: `x` f32 [200,1,8,8] only (training rows; 200 = 3*64 + 8, so the last calibration batch is partial) |
| `bn/expected/` | `recal.json`, `recal_epoch_3.safetensors`, `recal_mean_4_6.safetensors`, `aswa_recal.safetensors` (see "BatchNorm recalibration"); `aswa_accuracy.json` = plain ASWA without recalibration, for contrast |

| `bn_folded/` | made by `scripts/gen_folded_fixture.py` (and `legacy.onnx` by `scripts/gen_legacy_exports.py`): CNN conv1 (with bias) -> bn1 -> ReLU -> max-pool -> conv2 (no bias) -> bn2 -> ReLU -> mean -> fc; `checkpoints/epoch_{1..6}`, `val.npz`; `folded.onnx` (torch's default export: BN folded, names kept, `conv2.weight_bias` created), `legacy.onnx` (legacy exporter: BN folded, renamed `onnx::Conv_*`), `unfolded.onnx` (dynamo=True, optimize=False), all in epoch_6's state |

All `exports/*.onnx` are single files (initializers inline). `kge/` has no
BatchNorm: recalibration there is a no-op (with a notice).

## BatchNorm recalibration

`--recalibrate-bn CALIB.npz` expectations are written by the independent
reference `scripts/reference_bn.py`. For a candidate (a checkpoint, or the
uniform average of checkpoints rounded once to the dtype as above), every
BatchNorm's `running_mean` / `running_var` is recomputed exactly as
`torch.optim.swa_utils.update_bn` does: stats reset, momentum None (equal-weight
cumulative average over the batches), model in train mode so each BatchNorm
normalises with its own batch statistics (biased variance, eps 1e-5) and later
layers see those outputs, the stored `running_var` = mean over batches of the
UNBIASED batch variance (n/(n-1); n = rows, or rows*H*W for BatchNorm2d).
Dropout stays in EVAL mode (identity) during the pass (plain `update_bn` would
leave it in train mode; in `bn/` that would change `bn2`'s stats; the eval-mode
ONNX export has no Dropout node). Batches: consecutive rows of `x` in order,
batch size 64, last batch smaller, no shuffling. `num_batches_tracked` and every
other tensor are left as in the candidate (so the `.safetensors` differ from the
candidate only in the running stats; all f32). torch's stats agree with a
float64 numpy forward pass within 1e-6 (absolute; relative above 1: at most
6e-7 in these fixtures), so compare recalibrated running stats with a tolerance
(~1e-5 relative); scoring the numpy stats instead gives identical accuracies and
ASWA decisions, and so does scoring stats perturbed by 1e-4 relative noise (the
smallest top-1/top-2 logit margin of any recalibrated candidate scored is
> 5e-4). In the recalibrated ASWA run epoch_4's own score equals its look-ahead
score (0.961098 both): not a hard step (strict), a soft one.

`recal.json`: `batch_size`, `calib_rows`, `calib_batches`, `metric` (accuracy,
onnxruntime, argmax ties -> lowest index), `val` = {candidate: {`plain`,
`recalibrated`}} (digits: `epoch_5`; bn: `epoch_3`, `mean_4_6` = float64 mean of
epochs 4, 5, 6 rounded to f32, `num_batches_tracked` from epoch_6), and for bn
`aswa` = the ASWA rule above where EVERY scored candidate (each checkpoint and
each look-ahead average) is recalibrated before scoring (`steps`, `members`,
`val_score`, same fields as the ASWA JSON, plus `recalibrated: true`);
`aswa_recal.safetensors` = the final members' average, recalibrated. Re-derive:

    python scripts/reference_bn.py fixtures/bn/checkpoints/epoch_3.safetensors --arch bn_cnn \\
        --calib fixtures/bn/calib.npz --batch-size 64 --out /tmp/recal_epoch_3.safetensors \\
        --model fixtures/bn/model.onnx --val fixtures/bn/val.npz
    python scripts/reference_bn.py fixtures/bn/checkpoints --arch bn_cnn --calib fixtures/bn/calib.npz \\
        --model fixtures/bn/model.onnx --val fixtures/bn/val.npz --out /tmp/aswa.json

## Selection strategies

`strategies_*.json` are written by the independent reference
`scripts/reference_strategies.py` (which reuses `reference_aswa.py`'s reader,
averaging and scoring), e.g.

    python scripts/reference_strategies.py fixtures/digits/checkpoints \
        --model fixtures/digits/model.onnx --val fixtures/digits/val.npz \
        --test fixtures/digits/test.npz --metric accuracy \
        --out fixtures/digits/expected/strategies_accuracy.json \
        --weights-dir fixtures/digits/expected/strategies

    # strategies_params.json:
    #   --strategies swa,uniform,ema,top-k,greedy-soup --swa-start-at 10 --swa-every 2
    #   --last 4 --ema-decay 0.5 --k 3 --strict

Checkpoints are indexed 0..N-1 in natural order. "Uniform average" = float64 mean
of the members rounded once to the checkpoint dtype, integer tensors from the
newest member. "Best first" = by validation score, better first, ties -> earlier
checkpoint, NaN last.

| strategy | members |
|---|---|
| `aswa` | the ASWA rule above (`params.accept_ties`) |
| `swa` | s, s+K, ... < N; s = floor(swa_start * N) (default 0.75) or the checkpoint whose last integer in its name equals `swa_start_at`; K = `swa_every` (default 1); uniform average |
| `uniform` | all, or the last `last` checkpoints; uniform average |
| `ema` | e = theta_0; e = D*e + (1-D)*theta_i for i = 1..N-1 in float64 (two products, then the sum; no FMA), rounded once at the end; D = `ema_decay` (default 0.9); members = all; integer tensors from the last checkpoint |
| `top-k` | the first `k` (default 5) in best-first order; uniform average |
| `greedy-soup` | best-first order; soup = {first}; each next c joins iff score(avg(soup + c)) >= v (`strict`: >), then v = that score; `steps[]` lists every trial |
| `best` | the first in best-first order (weights = a copy of the checkpoint) |
| `last` | the last checkpoint (a copy) |

JSON: `metric`, `higher_is_better`, `checkpoints`, `checkpoint_scores` (each
checkpoint's validation score, same order), `strategies` = {name: {`strategy`,
`params`, `members` (checkpoint order), `val_score`, `test_score` (on
`digits/test.npz`), `steps` (aswa, greedy-soup)}}. `strategies/<name>.safetensors`
holds each strategy's final weights (no metadata). Accuracy scores are exact
multiples of 1/437; the smallest top-1/top-2 logit margin over all validation
rows of every candidate scored is > 2e-4, so the expectations do not hinge on
float noise.

`scripts/score_onnx.py MODEL.onnx VAL.npz [--metric M] [--labels y] [--filter F]`
prints the score of an ONNX model with its own initializers (onnxruntime, the same
metrics), as one float, to check an exported model independently.
"""


def write_readme():
    import glob

    lines = [README_HEAD, "## ONNX models (generated)\n"]
    for p in sorted(glob.glob(os.path.join(FIX, "**", "*.onnx"), recursive=True)):
        s = onnx_summary(p)
        lines.append(f"### `{rel(p)[len('fixtures/'):]}`\n")
        lines.append(f"- inputs: {', '.join(f'`{n}` {t} {d}' for n, t, d in s['inputs'])}")
        lines.append(f"- outputs: {', '.join(f'`{n}` {t} {d}' for n, t, d in s['outputs'])}")
        lines.append(f"- nodes: {' '.join(s['ops'])}")
        lines.append("- initializers: " + ", ".join(f"`{n}` {t} {d} ({w})" for n, t, d, w in s["initializers"]))
        lines.append("")
    lines.append("## Reference results (generated)\n")
    short = {"init": "I", "hard": "H", "soft": "S", "reject": "r"}
    for p in sorted(glob.glob(os.path.join(FIX, "*", "expected", "*.json"))):
        if os.path.basename(p).startswith(("strategies_", "recal")):
            continue
        r = json.load(open(p))
        lines.append(f"### `{rel(p)[len('fixtures/'):]}`\n")
        lines.append(f"metric `{r['metric']}` (higher_is_better={str(r['higher_is_better']).lower()}, "
                     f"accept_ties={str(r['accept_ties']).lower()}); final members "
                     f"{', '.join(m.replace('.safetensors', '') for m in r['members'])}; val_score {r['val_score']:.6f}\n")
        lines.append("| checkpoint | running (checkpoint) score | look-ahead | decision | ensemble | n |")
        lines.append("|---|---|---|---|---|---|")
        for st in r["steps"]:
            la = "-" if st["lookahead_score"] is None else f"{st['lookahead_score']:.6f}"
            lines.append(f"| {st['checkpoint'].replace('.safetensors', '')} | {st['running_score']:.6f} | {la} | "
                         f"{st['decision']} | {st['ensemble_score']:.6f} | {st['members']} |")
        lines.append("\ndecisions: " + " ".join(short[s["decision"]] for s in r["steps"]) + "\n")
    recs = sorted(glob.glob(os.path.join(FIX, "*", "expected", "recal.json")))
    if recs:
        lines.append("## BatchNorm recalibration results (generated)\n")
    for p in recs:
        r = json.load(open(p))
        lines.append(f"### `{rel(p)[len('fixtures/'):]}`\n")
        lines.append(f"calibration: {r['calib_rows']} rows, batch size {r['batch_size']} "
                     f"({r['calib_batches']} batches); metric `{r['metric']}`\n")
        lines.append("| candidate | plain | recalibrated |")
        lines.append("|---|---|---|")
        for k, x in r["val"].items():
            lines.append(f"| {k} | {x['plain']:.6f} | {x['recalibrated']:.6f} |")
        a = r.get("aswa")
        if a:
            lines.append(f"\nASWA, every scored candidate recalibrated; final members "
                         f"{', '.join(m.replace('.safetensors', '') for m in a['members'])}; "
                         f"val_score {a['val_score']:.6f}\n")
            lines.append("| checkpoint | running (checkpoint) score | look-ahead | decision | ensemble | n |")
            lines.append("|---|---|---|---|---|---|")
            for st in a["steps"]:
                la = "-" if st["lookahead_score"] is None else f"{st['lookahead_score']:.6f}"
                lines.append(f"| {st['checkpoint'].replace('.safetensors', '')} | {st['running_score']:.6f} | {la} | "
                             f"{st['decision']} | {st['ensemble_score']:.6f} | {st['members']} |")
            lines.append("\ndecisions: " + " ".join(short[s["decision"]] for s in a["steps"]))
        lines.append("")
    strat = sorted(glob.glob(os.path.join(FIX, "*", "expected", "strategies_*.json")))
    if strat:
        lines.append("## Strategy results (generated)\n")
    for p in strat:
        r = json.load(open(p))
        sc = r["checkpoint_scores"]
        lines.append(f"### `{rel(p)[len('fixtures/'):]}`\n")
        lines.append(f"metric `{r['metric']}` (higher_is_better={str(r['higher_is_better']).lower()}); "
                     "checkpoint scores: " + ", ".join(
                         f"{c.replace('.safetensors', '')} {s:.6f}" for c, s in zip(r["checkpoints"], sc)) + "\n")
        ties = [[c for c, s in zip(r["checkpoints"], sc) if s == v] for v in sorted(set(sc), key=sc.index)]
        ties = [t for t in ties if len(t) > 1]
        lines.append("exact ties among checkpoint scores (broken by checkpoint order): "
                     + ("; ".join(" = ".join(c.replace(".safetensors", "") for c in t) for t in ties) or "none") + "\n")
        lines.append("| strategy | params | members | val_score | test_score |")
        lines.append("|---|---|---|---|---|")
        for name, x in r["strategies"].items():
            params = ", ".join(f"{k}={json.dumps(v)}" for k, v in x["params"].items()) or "-"
            members = ", ".join(m.replace(".safetensors", "") for m in x["members"])
            lines.append(f"| {name} | {params} | {members} | {x['val_score']:.6f} | {x['test_score']:.6f} |")
        gs = r["strategies"].get("greedy-soup")
        if gs:
            trials = " ".join(f"{st['checkpoint'].replace('.safetensors', '').replace('epoch_', 'e')}"
                              f"({st['score']:.6f}{'+' if st['added'] else '-'})" for st in gs["steps"])
            lines.append(f"\ngreedy-soup trials (score of soup + checkpoint, + added / - not): {trials}")
        lines.append("")
    with open(os.path.join(FIX, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv):
    groups = argv or ["digits", "lowp", "kge", "exports", "bn"]
    os.makedirs(FIX, exist_ok=True)
    summary = {}
    if "digits" in groups:
        summary["digits"] = gen_digits()
    if "lowp" in groups:
        summary["lowp"] = gen_digits_lowp()
    if "kge" in groups:
        summary["kge"] = gen_kge()
    if "exports" in groups:
        summary["exports"] = gen_exports()
    if {"digits", "lowp", "strategies"} & set(groups):  # digits/lowp wipe their expected/ dirs
        summary["strategies"] = gen_strategies()
    if {"digits", "bn"} & set(groups):  # digits wipes digits/calib.npz and digits/expected/recal*
        summary["bn"] = gen_bn()
    write_readme()
    total = 0
    for dp, _, fs in os.walk(FIX):
        total += sum(os.path.getsize(os.path.join(dp, f)) for f in fs)
    log(f"fixtures total size: {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main(sys.argv[1:])
