#!/usr/bin/env python3
"""Writes the fuzz seed corpora, fuzz/corpus/{checkpoint,npz,onnx}/.

Standard library only (no numpy, onnx or safetensors needed). Real inputs are copied
from fixtures/; the malformed ones are built byte by byte here so that the seeds
start the fuzzer next to every check the readers make. Run from the repository root:

    python3 fuzz/seeds.py

The corpus is small on purpose (< 1 MB): libFuzzer's mutations do the rest.
"""

import json
import shutil
import struct
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
CORPUS = ROOT / "fuzz" / "corpus"
ARTIFACTS = ROOT / "fuzz" / "artifacts"


def out(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def repro(target, name, data):
    """A reproducer of a bug found by fuzzing: fuzz/artifacts/<target>/repro-<name>.
    Kept out of the corpus so that the fuzzer does not stop on it at start-up;
    scripts/fuzz.sh replays every reproducer before fuzzing."""
    d = ARTIFACTS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"repro-{name}").write_bytes(data)


def copy(target, name, src):
    out(target, name, (FIX / src).read_bytes())


# ---------------------------------------------------------------- safetensors


def st(header, data=b"", raw_header=None):
    """A safetensors file: 8-byte little-endian header length, JSON header, data."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def f32(*v):
    return struct.pack(f"<{len(v)}f", *v)


def checkpoint_seeds():
    copy("checkpoint", "digits_f32.safetensors", "digits/checkpoints/epoch_1.safetensors")
    copy("checkpoint", "digits_f16.safetensors", "digits_f16/checkpoints/epoch_1.safetensors")
    copy("checkpoint", "digits_bf16.safetensors", "digits_bf16/checkpoints/epoch_1.safetensors")
    copy("checkpoint", "kge.safetensors", "kge/checkpoints/epoch_1.safetensors")
    copy("checkpoint", "cnn.safetensors", "exports/cnn_checkpoints/epoch_1.safetensors")
    t = lambda dt, shape, a, b: {"dtype": dt, "shape": shape, "data_offsets": [a, b]}
    seeds = {
        # Valid, small, every dtype family the tool handles.
        "mixed.safetensors": st(
            {
                "__metadata__": {"format": "pt"},
                "w": t("F32", [2, 2], 0, 16),
                "h": t("F16", [2], 16, 20),
                "b": t("BF16", [2], 20, 24),
                "d": t("F64", [1], 24, 32),
                "steps": t("I64", [], 32, 40),
                "mask": t("BOOL", [3], 40, 43),
                "empty": t("F32", [0, 5], 43, 43),
            },
            f32(1, -2, 0.5, float("inf")) + b"\x00\x3c\x00\xbc" + b"\x80\x3f\x80\xbf"
            + struct.pack("<d", 1e300) + struct.pack("<q", 7) + b"\x01\x00\x01",
        ),
        "nan.safetensors": st({"w": t("F32", [2], 0, 8)}, f32(float("nan"), -0.0)),
        "unaligned.safetensors": st(
            {"a": t("U8", [1], 0, 1), "w": t("F32", [1], 1, 5)}, b"\x01" + f32(3.0)
        ),
        # Broken.
        "empty": b"",
        "short": b"\x05\x00\x00",
        "text": b"this is not a safetensors file at all",
        "huge_header_len.safetensors": struct.pack("<Q", 1 << 40) + b"{}",
        "header_past_eof.safetensors": struct.pack("<Q", 64) + b"{}",
        "no_tensors.safetensors": st({}),
        "only_metadata.safetensors": st({"__metadata__": {"aswa_merge.version": "0"}}),
        "bad_json.safetensors": st(None, raw_header=b'{"w": [1, 2'),
        "not_utf8.safetensors": st(None, raw_header=b'{"\xff": 1}'),
        "duplicate.safetensors": st(
            None,
            f32(1, 2),
            raw_header=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        ),
        "overlap.safetensors": st(
            {"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, bytes(12)
        ),
        "gap.safetensors": st({"a": t("F32", [1], 4, 8)}, bytes(8)),
        "past_eof.safetensors": st({"a": t("F32", [4], 0, 16)}, bytes(8)),
        "trailing.safetensors": st({"a": t("F32", [1], 0, 4)}, bytes(12)),
        "shape_len.safetensors": st({"a": t("F32", [3], 0, 8)}, bytes(8)),
        "shape_overflow.safetensors": st(
            {"a": t("F32", [1 << 40, 1 << 40, 0], 0, 0)}
        ),
        "negative_dim.safetensors": st(None, raw_header=b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}}'),
        "fp8.safetensors": st({"a": t("F8_E4M3", [2], 0, 2)}, bytes(2)),
        "unknown_dtype.safetensors": st({"a": t("Q4", [2], 0, 2)}, bytes(2)),
        "offsets_reversed.safetensors": st({"a": t("F32", [0], 4, 0)}, bytes(4)),
        "metadata_not_strings.safetensors": st(
            {"__metadata__": {"n": 1}, "a": t("F32", [1], 0, 4)}, f32(1)
        ),
    }
    for name, data in seeds.items():
        out("checkpoint", name, data)


# ---------------------------------------------------------------- npz


def npy(descr, shape, data, fortran=False, version=1):
    """A .npy file (format 1.0 or 2.0)."""
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (
        descr,
        "True" if fortran else "False",
        "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")",
    )
    pre = 10 if version == 1 else 12
    pad = (64 - (pre + len(header) + 1) % 64) % 64
    header = header + " " * pad + "\n"
    lenfmt = "<H" if version == 1 else "<I"
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack(lenfmt, len(header)) + header.encode() + data


def npz(arrays, compressed=False):
    import io

    buf = io.BytesIO()
    mode = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", mode) as z:
        for name, data in arrays.items():
            z.writestr(name if name.endswith(".npy") else name + ".npy", data)
    return buf.getvalue()


def i64(*v):
    return struct.pack(f"<{len(v)}q", *v)


def npz_seeds():
    copy("npz", "kge_val.npz", "kge/val.npz")
    copy("npz", "kge_filter.npz", "kge/filter.npz")
    copy("npz", "digits_val_compressed.npz", "digits/val_compressed.npz")
    seeds = {
        "small.npz": npz(
            {
                "x": npy("<f4", [2, 3], f32(*range(6))),
                "y": npy("<i8", [2], i64(0, 1)),
                "b": npy("|b1", [2], b"\x01\x00"),
                "u": npy("|u1", [2], b"\x01\x02"),
                "h": npy("<f2", [1], b"\x00\x3c"),
            }
        ),
        "small_compressed.npz": npz(
            {"x": npy("<f8", [2], struct.pack("<2d", 1, 2)), "y": npy("<i4", [2], struct.pack("<2i", 1, 0))},
            compressed=True,
        ),
        "filter_ok.npz": npz({"indptr": npy("<i8", [3], i64(0, 2, 3)), "indices": npy("<i8", [3], i64(5, 5, 1))}),
        "filter_bad.npz": npz({"indptr": npy("<i8", [3], i64(0, 4, 3)), "indices": npy("<i8", [3], i64(5, 5, 1))}),
        "filter_float.npz": npz({"indptr": npy("<f4", [2], f32(0, 1)), "indices": npy("<i8", [1], i64(2))}),
        "big_endian.npz": npz({"x": npy(">f4", [2], struct.pack(">2f", 1, 2))}),
        "fortran.npz": npz({"x": npy("<f4", [2, 2], f32(1, 2, 3, 4), fortran=True)}),
        "float16.npz": npz({"x": npy("<f2", [2, 2], struct.pack("<4e", 1, 2, 3, 4), fortran=True),
                            "y": npy("<u2", [2], struct.pack("<2H", 1, 0))}),
        "unsigned.npz": npz({"y": npy("<u4", [2], struct.pack("<2I", 1, 0)),
                             "z": npy("<u8", [2], struct.pack("<2Q", 1, 2**63))}),
        "v2_header.npz": npz({"x": npy("<i8", [1], i64(9), version=2)}),
        "scalar.npz": npz({"y": npy("<i8", [], i64(3))}),
        "short_data.npz": npz({"x": npy("<f4", [4], f32(1))}),
        "extra_data.npz": npz({"x": npy("<f4", [1], f32(1, 2))}),
        "object.npz": npz({"x": npy("|O", [1], b"\x00" * 8)}),
        "complex.npz": npz({"x": npy("<c8", [1], bytes(8))}),
        "bad_magic.npz": npz({"x": b"\x93NUMPX\x01\x00" + bytes(20)}),
        "empty.npz": npz({}),
        "not_zip.npz": b"x,y\n1,2\n",
        "empty": b"",
    }
    for name, data in seeds.items():
        out("npz", name, data)
    # Found by the fuzzer (bug 1 in docs/reliability.md): a header that declares a huge
    # array makes ndarray-npy allocate it before reading; the allocation fails and the
    # process aborts (SIGABRT) instead of reporting a bad file.
    repro("npz", "huge-shape.npz", npz({"x": npy("<f4", [1 << 40], b"")}))
    repro(
        "npz",
        "huge-indptr.npz",
        npz({"indptr": npy("<i8", [1 << 40], b""), "indices": npy("<i8", [0], b"")}),
    )


# ---------------------------------------------------------------- onnx (protobuf by hand)


def varint(n):
    n &= (1 << 64) - 1
    b = bytearray()
    while True:
        c = n & 0x7F
        n >>= 7
        if n:
            b.append(c | 0x80)
        else:
            b.append(c)
            return bytes(b)


def fv(field, n):  # varint field
    return varint(field << 3) + varint(n)


def fb(field, data):  # length-delimited field
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


FLOAT, INT64 = 1, 7


def tensor(name, dims, dtype=FLOAT, raw=None, external=None):
    m = b"".join(fv(1, d) for d in dims) + fv(2, dtype) + fb(8, name)
    if raw is not None:
        m += fb(9, raw)
    if external is not None:
        for k, v in external:
            m += fb(13, fb(1, k) + fb(2, v))
        m += fv(14, 1)  # EXTERNAL
    return m


def value_info(name, elem, dims):
    shape = b"".join(fb(1, fv(1, d) if isinstance(d, int) else fb(2, d)) for d in dims)
    return fb(1, name) + fb(2, fb(1, fv(1, elem) + fb(2, shape)))


def node(op, inputs, outputs):
    return b"".join(fb(1, i) for i in inputs) + b"".join(fb(2, o) for o in outputs) + fb(4, op)


def model(graph, ir=8):
    opset = fb(1, "") + fv(2, 17)
    return fv(1, ir) + fb(2, "seeds.py") + fb(7, graph) + fb(8, opset)


def graph(nodes=(), inits=(), inputs=(), outputs=()):
    return (
        b"".join(fb(1, n) for n in nodes)
        + fb(2, "g")
        + b"".join(fb(5, t) for t in inits)
        + b"".join(fb(11, v) for v in inputs)
        + b"".join(fb(12, v) for v in outputs)
    )


def onnx_seeds():
    copy("onnx", "digits_external.onnx", "digits/model.onnx")
    copy("onnx", "kge_external.onnx", "kge/model.onnx")
    copy("onnx", "folded.onnx", "exports/folded.onnx")
    copy("onnx", "fused_bn.onnx", "exports/fused_bn.onnx")
    copy("onnx", "fused_bn_legacy.onnx", "exports/fused_bn_legacy.onnx")
    copy("onnx", "cnn.onnx", "exports/cnn.onnx")
    # digits/inline/model.onnx is 26 KB; cnn.onnx (21 KB) already covers inline weights.
    copy("onnx", "digits_inline.onnx", "digits/inline/model.onnx")
    w = tensor("w", [2, 2], raw=f32(1, 2, 3, 4))
    linear = graph(
        nodes=[node("MatMul", ["x", "w"], ["y"])],
        inits=[w],
        inputs=[value_info("x", FLOAT, ["batch", 2])],
        outputs=[value_info("y", FLOAT, ["batch", 2])],
    )
    seeds = {
        "linear.onnx": model(linear),
        "linear_ir3.onnx": model(
            graph(
                nodes=[node("MatMul", ["x", "w"], ["y"])],
                inits=[w],
                inputs=[value_info("x", FLOAT, [1, 2]), value_info("w", FLOAT, [2, 2])],
                outputs=[value_info("y", FLOAT, [1, 2])],
            ),
            ir=3,
        ),
        "external_ok.onnx": model(
            graph(inits=[tensor("fc1.weight", [64, 64], external=[("location", "model.onnx.data"), ("offset", "0"), ("length", "16384")])],
                  outputs=[value_info("y", FLOAT, [1])])
        ),
        "external_missing.onnx": model(
            graph(inits=[tensor("w", [2], external=[("location", "no_such.data")])])
        ),
        "external_past_eof.onnx": model(
            graph(inits=[tensor("w", [2], external=[("location", "model.onnx.data"), ("offset", "18446744073709551615"), ("length", "8")])])
        ),
        "external_bad_number.onnx": model(
            graph(inits=[tensor("w", [2], external=[("location", "model.onnx.data"), ("offset", "-1")])])
        ),
        "external_no_location.onnx": model(graph(inits=[tensor("w", [2], external=[("length", "8")])])),
        "negative_dims.onnx": model(graph(inits=[tensor("w", [-1, 3], raw=b"")])),
        "overflow_dims.onnx": model(graph(inits=[tensor("w", [1 << 62, 1 << 62], raw=b"")])),
        "int_and_scalar.onnx": model(
            graph(inits=[tensor("shape", [2], dtype=INT64, raw=i64(1, 2)), tensor("eps", [], raw=f32(1e-5))])
        ),
        "unknown_dtype.onnx": model(graph(inits=[tensor("w", [2], dtype=1000, raw=bytes(8))])),
        "no_graph.onnx": fv(1, 8) + fb(2, "seeds.py"),
        "empty_graph.onnx": model(b""),
        "truncated.onnx": model(linear)[:-7],
        "not_protobuf.onnx": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
        "empty": b"",
    }
    for name, data in seeds.items():
        out("onnx", name, data)


if __name__ == "__main__":
    for target in ("checkpoint", "npz", "onnx"):
        shutil.rmtree(CORPUS / target, ignore_errors=True)
    checkpoint_seeds()
    npz_seeds()
    onnx_seeds()
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    count = sum(1 for p in CORPUS.rglob("*") if p.is_file())
    print(f"{count} seed files, {total} bytes in {CORPUS}")
