#!/usr/bin/env python3
"""Independent Python reference for BatchNorm recalibration (`--recalibrate-bn CALIB.npz`).

Semantics (what the reference computes; shares no code with the Rust tool):

For a candidate model (a checkpoint, or the uniform average of checkpoints:
float64 mean of the members rounded once to the checkpoint dtype, see
reference_aswa.py), every BatchNorm layer's `running_mean` and `running_var`
are recomputed exactly as `torch.optim.swa_utils.update_bn(loader, model)` does
on calibration data:

* running stats are reset and momentum is None, i.e. the new running stats are
  the cumulative (equal-weight) average over the calibration batches of each
  batch's mean and of each batch's UNBIASED variance (n / (n - 1) times the
  biased one; n = rows, or rows * H * W for BatchNorm2d);
* the model is in train mode, so during the pass every BatchNorm normalises
  with its own batch statistics (biased variance, eps), and later layers see
  those batch-normalised activations;
* Dropout stays in EVAL mode during the pass (identity). Plain `update_bn` puts
  the whole model in train mode, dropout included; here a forward pre-hook on
  the root module switches every dropout module back to eval after update_bn's
  `model.train()`, before each forward;
* calibration batches are consecutive rows of the calibration npz's `x`, in
  order, of batch size B (the last batch may be smaller), no shuffling;
* `num_batches_tracked` is left as in the candidate (update_bn would set it to
  the number of calibration batches); every other tensor is unchanged.

Two implementations are provided and cross-checked:

* `recalibrate(model_builder, state_dict, x_calib, batch_size)`: torch's real
  `update_bn` over a `DataLoader(TensorDataset(x), batch_size, shuffle=False)`;
* `numpy_recalibrate(arch, tensors, x_calib, batch_size)`: a float64 numpy
  forward pass written by hand for the two fixture architectures
  (`digits_mlp`, `bn_cnn`), accumulating the arithmetic mean of the batch
  statistics in float64.

`run_aswa_recal(...)` is reference_aswa.py's ASWA loop with a hook: EVERY scored
candidate (each checkpoint and each look-ahead average) is recalibrated before
it is scored, and the final averaged weights are recalibrated as well.

CLI:
  # one candidate (several checkpoints = their uniform average), recalibrated
  python scripts/reference_bn.py CKPT.safetensors [CKPT2 ...] --arch bn_cnn \
      --calib fixtures/bn/calib.npz [--batch-size 64] [--out recal.safetensors] \
      [--model fixtures/bn/model.onnx --val fixtures/bn/val.npz]
  # ASWA with every candidate recalibrated
  python scripts/reference_bn.py fixtures/bn/checkpoints --arch bn_cnn \
      --calib fixtures/bn/calib.npz --model fixtures/bn/model.onnx \
      --val fixtures/bn/val.npz --out aswa.json [--out-weights final.safetensors]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference_aswa as ref  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

BN_EPS = 1e-5  # torch's default; the fixture models use it (checked against the ONNX attribute)


# --------------------------------------------------------------------------
# the two fixture architectures (state_dict keys == ONNX initializer names)
# --------------------------------------------------------------------------


class DigitsMLP(nn.Module):
    """fixtures/digits: fc1 Linear(64,64) -> bn BatchNorm1d(64) -> ReLU -> fc2 Linear(64,10)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.bn = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class BnCNN(nn.Module):
    """fixtures/bn: conv Conv2d(1,4,3,p=1) -> bn1 BatchNorm2d(4) -> ReLU -> flatten ->
    drop Dropout(0.2) -> fc1 Linear(256,32) -> bn2 BatchNorm1d(32) -> ReLU -> fc2 Linear(32,10).

    The dropout sits BETWEEN the two BatchNorms, so bn2's recalibrated stats depend
    on the dropout mode during the pass (eval here; a plain update_bn differs)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 8 * 8, 32)
        self.bn2 = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = self.drop(torch.flatten(torch.relu(self.bn1(self.conv(x))), 1))
        return self.fc2(torch.relu(self.bn2(self.fc1(h))))


ARCHS: Dict[str, Callable[[], nn.Module]] = {"digits_mlp": DigitsMLP, "bn_cnn": BnCNN}

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def bn_stat_names(model: nn.Module) -> List[str]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out += [f"{name}.running_mean", f"{name}.running_var"]
    return out


# --------------------------------------------------------------------------
# torch: the real update_bn
# --------------------------------------------------------------------------


def _load(model: nn.Module, state_dict) -> None:
    sd = {}
    for k, v in state_dict.items():
        t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, copy=True))
        sd[k] = t
    model.load_state_dict(sd, strict=True)


def recalibrate(model_builder: Callable[[], nn.Module], state_dict, x_calib: np.ndarray,
                batch_size: int) -> Dict[str, np.ndarray]:
    """Recompute every BatchNorm's running_mean/running_var with torch.optim.swa_utils.update_bn.

    `state_dict`: {name: numpy array or torch tensor} (all keys of the model).
    Returns {"<bn>.running_mean": array, "<bn>.running_var": array} in the model's
    dtype (float32 for the fixtures). Dropout is kept in eval mode during the pass.
    """
    from torch.utils.data import DataLoader, TensorDataset

    model = model_builder()
    _load(model, state_dict)
    model.eval()
    dropouts = [m for m in model.modules() if isinstance(m, _DROPOUT)]
    seen_modes = []

    def keep_dropout_eval(mod, args):
        # update_bn calls model.train() (dropout included) before the pass
        for d in dropouts:
            d.eval()
        seen_modes.append(tuple(m.training for m in model.modules()
                                if isinstance(m, nn.modules.batchnorm._BatchNorm)))

    h = model.register_forward_pre_hook(keep_dropout_eval)
    x = torch.from_numpy(np.ascontiguousarray(x_calib))
    loader = DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=False)
    try:
        torch.optim.swa_utils.update_bn(loader, model)
    finally:
        h.remove()
    n_batches = (len(x) + batch_size - 1) // batch_size
    assert len(seen_modes) == n_batches, (len(seen_modes), n_batches)
    assert all(all(s) for s in seen_modes), "a BatchNorm was not in train mode during the pass"
    out = {}
    mods = dict(model.named_modules())
    for name in bn_stat_names(model):
        mod_name, attr = name.rsplit(".", 1)
        m = mods[mod_name]
        assert int(m.num_batches_tracked) == n_batches
        out[name] = getattr(m, attr).detach().numpy().copy()
    return out


def recalibrated_state(model_builder, tensors: Dict[str, np.ndarray], x_calib, batch_size,
                       stats: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """All candidate tensors, with the BN running stats replaced (num_batches_tracked untouched)."""
    if stats is None:
        stats = recalibrate(model_builder, tensors, x_calib, batch_size)
    out = {k: np.array(v, copy=True) for k, v in tensors.items()}
    for k, v in stats.items():
        assert k in out and out[k].shape == v.shape, k
        out[k] = v.astype(out[k].dtype)
    return out


# --------------------------------------------------------------------------
# numpy: independent float64 forward by hand
# --------------------------------------------------------------------------


def _f64(t, k):
    return np.asarray(t[k], dtype=np.float64)


def _bn_train(h: np.ndarray, t, name: str, axes, acc: Dict[str, list]) -> np.ndarray:
    """BatchNorm in train mode: normalise with the batch stats; record mean / unbiased var."""
    n = int(np.prod([h.shape[a] for a in axes]))
    mean = h.mean(axis=axes)
    var = h.var(axis=axes)  # biased, used to normalise
    acc.setdefault(f"{name}.running_mean", []).append(mean)
    acc.setdefault(f"{name}.running_var", []).append(var * n / (n - 1))
    shape = [1] * h.ndim
    shape[1] = h.shape[1]
    g = _f64(t, f"{name}.weight").reshape(shape)
    b = _f64(t, f"{name}.bias").reshape(shape)
    return (h - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + BN_EPS) * g + b


def _conv3x3_p1(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Conv2d, stride 1, padding 1, cross-correlation; x [N,C,H,W], w [O,C,3,3]."""
    n, c, hh, ww = x.shape
    kh, kw = w.shape[2], w.shape[3]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], hh, ww), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i : i + hh, j : j + ww]  # [N,C,H,W]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def _fwd_digits_mlp(xb, t, acc):
    h = xb @ _f64(t, "fc1.weight").T + _f64(t, "fc1.bias")
    h = np.maximum(_bn_train(h, t, "bn", (0,), acc), 0.0)
    return h @ _f64(t, "fc2.weight").T + _f64(t, "fc2.bias")


def _fwd_bn_cnn(xb, t, acc):
    h = _conv3x3_p1(xb, _f64(t, "conv.weight"), _f64(t, "conv.bias"))
    h = np.maximum(_bn_train(h, t, "bn1", (0, 2, 3), acc), 0.0)
    h = h.reshape(h.shape[0], -1)  # torch.flatten(., 1): C, H, W order
    # Dropout in eval mode: identity
    h = h @ _f64(t, "fc1.weight").T + _f64(t, "fc1.bias")
    h = np.maximum(_bn_train(h, t, "bn2", (0,), acc), 0.0)
    return h @ _f64(t, "fc2.weight").T + _f64(t, "fc2.bias")


NUMPY_FWD = {"digits_mlp": _fwd_digits_mlp, "bn_cnn": _fwd_bn_cnn}


def numpy_recalibrate(arch: str, tensors: Dict[str, np.ndarray], x_calib: np.ndarray,
                      batch_size: int) -> Dict[str, np.ndarray]:
    """float64 stats: equal-weight mean over the batches of each batch's mean / unbiased var."""
    fwd = NUMPY_FWD[arch]
    x = np.asarray(x_calib, dtype=np.float64)
    acc: Dict[str, list] = {}
    for s in range(0, len(x), batch_size):
        fwd(x[s : s + batch_size], tensors, acc)
    return {k: np.mean(np.stack(v), axis=0) for k, v in acc.items()}


def max_abs_diff(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)


def max_scaled_diff(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> float:
    """max |a - b| / max(1, |b|): absolute below 1, relative above (float32 stats of size ~10
    carry ~1e-6 of rounding by themselves)."""
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))
                            / np.maximum(1.0, np.abs(np.asarray(b[k], np.float64))))) for k in a)


def checked_recalibrate(arch: str, tensors: Dict[str, np.ndarray], x_calib, batch_size, tol: float = 1e-6,
                        record: Optional[list] = None) -> Dict[str, np.ndarray]:
    """torch update_bn stats, asserted equal to the numpy reference: |torch - numpy| <= tol * max(1, |numpy|).

    `record` (a list) receives (max abs diff, max scaled diff) per call."""
    st = recalibrate(ARCHS[arch], tensors, x_calib, batch_size)
    npst = numpy_recalibrate(arch, tensors, x_calib, batch_size)
    d, r = max_abs_diff(st, npst), max_scaled_diff(st, npst)
    if record is not None:
        record.append((d, r))
    assert r <= tol, f"torch vs numpy BN stats differ by {d} (scaled {r})"
    return st


# --------------------------------------------------------------------------
# scoring helpers and ASWA with recalibration
# --------------------------------------------------------------------------


def min_margin(logits: np.ndarray) -> float:
    """Smallest top-1 minus top-2 logit gap over the rows (how fragile an accuracy is)."""
    z = np.sort(np.asarray(logits, np.float64), axis=1)
    return float(np.min(z[:, -1] - z[:, -2]))


def run_aswa_recal(ckpt_dir: str, model: str, val: str, recal: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]],
                   metric: str = "accuracy", accept_ties: bool = False, pattern: str = "*.safetensors",
                   margins: Optional[list] = None):
    """reference_aswa's ASWA rule where every scored candidate is `recal(candidate)` first.

    Returns (result dict in reference_aswa's format + "recalibrated": true,
    final averaged-then-recalibrated tensors).
    """
    canon, _ = ref.canonical_metric(metric)
    higher = canon not in ref.LOWER_IS_BETTER
    names = ref.list_checkpoints(ckpt_dir, pattern)
    ckpts = [ref.read_safetensors(os.path.join(ckpt_dir, n)) for n in names]
    scorer = ref.Scorer(model, val, metric)

    def score(tensors):
        out = scorer.outputs(recal(tensors))
        if margins is not None:
            margins.append(min_margin(out))
        return ref.compute_metric(metric, out, scorer.val[scorer.label])

    def raw(i):
        return {k: v for k, (_, v) in ckpts[i].items()}

    members = [0]
    v_a = score(raw(0))
    steps = [{"checkpoint": names[0], "running_score": v_a, "ensemble_score": v_a, "lookahead_score": None,
              "decision": "init", "members": 1}]
    for t in range(1, len(names)):
        v_t = score(raw(t))
        look = members + [t]
        v_p = score(ref.average(ckpts, look))
        if ref._better(v_t, v_p, higher) and ref._better(v_t, v_a, higher):
            decision, members, v_a = "hard", [t], v_t
        elif ref._better(v_p, v_a, higher, allow_eq=accept_ties):
            decision, members, v_a = "soft", look, v_p
        else:
            decision = "reject"
        steps.append({"checkpoint": names[t], "running_score": v_t, "ensemble_score": v_a, "lookahead_score": v_p,
                      "decision": decision, "members": len(members)})
    final = recal(ref.average(ckpts, members))
    assert score(final) == v_a  # recalibration is deterministic: the final weights score v_A
    result = {
        "metric": ref.metric_display(metric),
        "higher_is_better": higher,
        "accept_ties": bool(accept_ties),
        "recalibrated": True,
        "checkpoints": names,
        "steps": steps,
        "members": [names[i] for i in members],
        "val_score": v_a,
    }
    return result, final


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="checkpoint file(s) (averaged), or one checkpoint directory (ASWA)")
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS))
    ap.add_argument("--calib", required=True, help="npz with the calibration rows in `x`")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", help="ONNX model (score plain vs recalibrated / ASWA)")
    ap.add_argument("--val", help="validation npz")
    ap.add_argument("--metric", default="accuracy")
    ap.add_argument("--out", help="recalibrated .safetensors (file mode) or ASWA .json (directory mode)")
    ap.add_argument("--out-weights", help="ASWA mode: final recalibrated weights")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # as gen_fixtures.py: the f32 stats then match the fixtures bit for bit
    with np.load(a.calib) as f:
        x = f["x"]
    recal = lambda t: recalibrated_state(ARCHS[a.arch], t, x, a.batch_size,  # noqa: E731
                                         checked_recalibrate(a.arch, t, x, a.batch_size))
    if len(a.paths) == 1 and os.path.isdir(a.paths[0]):
        if not (a.model and a.val and a.out):
            ap.error("ASWA mode needs --model, --val and --out")
        result, final = run_aswa_recal(a.paths[0], a.model, a.val, recal, a.metric)
        ref.write_json(a.out, result)
        if a.out_weights:
            ref.write_safetensors(a.out_weights, final)
        print(" ".join(s["decision"] for s in result["steps"]), f"val_score={result['val_score']}")
        return
    cks = [ref.read_safetensors(p) for p in a.paths]
    cand = ref.average(cks, range(len(cks)))
    st = recalibrate(ARCHS[a.arch], cand, x, a.batch_size)
    npst = numpy_recalibrate(a.arch, cand, x, a.batch_size)
    print(f"max |torch - numpy| over the BN stats: {max_abs_diff(st, npst):.3g} "
          f"(scaled by max(1, |stat|): {max_scaled_diff(st, npst):.3g})")
    new = recalibrated_state(ARCHS[a.arch], cand, x, a.batch_size, st)
    if a.out:
        ref.write_safetensors(a.out, new)
    if a.model and a.val:
        sc = ref.Scorer(a.model, a.val, a.metric)
        print(f"{ref.metric_display(a.metric)}: plain {sc.score(cand):.6f} recalibrated {sc.score(new):.6f}")


if __name__ == "__main__":
    main()
