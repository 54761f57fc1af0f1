#!/usr/bin/env python3
"""Writes the ONNX fixtures of constant folding (tests/fixtures/onnx/), built node by node
with the `onnx` package (no Brevitas or PyTorch needed), and records ONNX Runtime's
predictions on the 450 test images:

  qcdq_nobias_pow2.onnx  a QCDQ graph laid out as Brevitas' export_onnx_qcdq writes a CNN
                         whose layers have no bias: 4-bit input quantizer, conv 1->8 3x3/2
                         with 2-bit (ternary) weights, 2-bit ReLU quantizer, flatten,
                         QuantLinear 128->32 without bias (int8 -> Clip -> DequantizeLinear
                         per output channel -> Transpose [1, 0] -> MatMul: the pattern
                         PyTorch writes for F.linear without bias), 2-bit ReLU quantizer,
                         and an output layer 32->10 whose int8 weights are transposed
                         *before* their DequantizeLinear. Every scale is a power of two, so
                         every quantizer's level spacing is a power of two in accumulator
                         units (16 in the conv layer, 4 and 8 in the dense layer).
  float_folds.onnx       a float CNN whose weights reach their layers through constant
                         subgraphs: HWIO conv weights -> Mul by a Constant -> Transpose,
                         a [1, 8] bias -> Squeeze, a flat dense weight -> Reshape -> Div ->
                         Transpose -> MatMul, a float64 bias -> Cast -> Add.
  fold_bad_perm.onnx     qcdq_nobias_pow2 with a Transpose perm that is not a permutation
                         (a refusal fixture).
  fold_predictions.json  ONNX Runtime 1.20.1's accuracy and predictions on test_x.npy.

Weights are fitted in numpy (fixed ternary edge filters, seeded random ternary hidden
units, a least-squares readout): the fixtures test the import, not training.

Run: scripts/fold-fixtures.sh (a venv with onnx==1.17.0, onnxruntime==1.20.1, numpy).
"""

import json
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_data import load_digits, split  # noqa: E402

OUT = sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/onnx"
DIGITS = sys.argv[1] if len(sys.argv) > 1 else ".cache/data/digits.csv.gz"


def quant(x, scale, lo, hi):
    """QuantizeLinear (zero point 0, ties to even) -> Clip -> DequantizeLinear."""
    return np.clip(np.round(x / np.float32(scale)), lo, hi).astype(np.float32) * np.float32(scale)


def conv3x3s2(x, w):
    """(N, 1, 8, 8) * (8, 1, 3, 3), padding 1, stride 2 -> (N, 8, 4, 4)."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((x.shape[0], w.shape[0], 4, 4), np.float32)
    for oy in range(4):
        for ox in range(4):
            patch = xp[:, :, 2 * oy:2 * oy + 3, 2 * ox:2 * ox + 3]
            out[:, :, oy, ox] = np.einsum("nchw,ochw->no", patch, w)
    return out


# fixed ternary filters: edges in four directions, both signs
FILTERS = np.array([
    [[-1, -1, -1], [0, 0, 0], [1, 1, 1]],
    [[1, 1, 1], [0, 0, 0], [-1, -1, -1]],
    [[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]],
    [[1, 0, -1], [1, 0, -1], [1, 0, -1]],
    [[0, 1, 1], [-1, 0, 1], [-1, -1, 0]],
    [[0, -1, -1], [1, 0, -1], [1, 1, 0]],
    [[-1, -1, 0], [-1, 0, 1], [0, 1, 1]],
    [[-1, 1, -1], [1, 1, 1], [-1, 1, -1]],
], np.int8).reshape(8, 1, 3, 3)

# power-of-two scales: input 1/16 (4 bits), conv weights 1/4, first activation 1/4
# (16 accumulator units of 1/64), dense weights 1/8 or 1/16 per output channel, second
# activation 1/8 (4 or 8 units of 1/32 or 1/64), output weights 1/16
S_IN, S_CONV, S_A1, S_A2, S_OUT = 2.0**-4, 2.0**-2, 2.0**-2, 2.0**-3, 2.0**-4


def ridge(f, y, lam):
    t = np.eye(10, dtype=np.float64)[y]
    f1 = np.hstack([f, np.ones((len(f), 1))]).astype(np.float64)
    w = np.linalg.solve(f1.T @ f1 + lam * np.eye(f1.shape[1]), f1.T @ t)
    return w[:-1].T, w[-1]


def qcdq_weights(xtr, ytr):
    """Integer weights and per-channel scales of the QCDQ model."""
    rng = np.random.default_rng(25)
    h1 = quant(np.maximum(conv3x3s2(quant(xtr, S_IN, 0, 15), FILTERS * np.float32(S_CONV)), 0),
               S_A1, 0, 3).reshape(len(xtr), -1)
    # hidden units: ternary readouts of a least-squares fit (its classes, their opposites
    # and random class mixtures)
    w, _ = ridge(h1, ytr, 1.0)
    u = np.vstack([w, -w, rng.normal(size=(12, 10)) @ w])
    w1 = np.where(np.abs(u) > 0.5 * np.abs(u).std(axis=1, keepdims=True), np.sign(u), 0).astype(np.int8)
    s1 = np.where(np.arange(32) % 2 == 0, 2.0**-3, 2.0**-4).astype(np.float32)
    h2 = quant(np.maximum(h1 @ (w1.astype(np.float32) * s1[:, None]).T, 0), S_A2, 0, 3)
    w2, _ = ridge(h2, ytr, 1.0)
    w2 = np.clip(np.round(w2 / np.abs(w2).max() * 3), -3, 3).astype(np.int8)
    return w1, s1, w2


def c(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def qcdq_model(w1, s1, w2, bad_perm=False):
    i8, u8 = np.int8, np.uint8
    init = [
        c("inp_s", np.float32(S_IN)), c("u8_0", u8(0)), c("u8_15", u8(15)), c("u8_3", u8(3)),
        c("conv_w", FILTERS), c("i8_m1", i8(-1)), c("i8_1", i8(1)), c("conv_s", np.float32(S_CONV)),
        c("i8_0", i8(0)), c("a1_s", np.float32(S_A1)),
        c("fc_w", w1), c("fc_s", s1), c("fc_zp", np.zeros(32, i8)), c("a2_s", np.float32(S_A2)),
        c("out_w", w2), c("i8_m3", i8(-3)), c("i8_3", i8(3)), c("out_s", np.float32(S_OUT)),
    ]
    n = helper.make_node
    nodes = [
        n("QuantizeLinear", ["input", "inp_s", "u8_0"], ["xq"], name="/inp/QuantizeLinear"),
        n("Clip", ["xq", "u8_0", "u8_15"], ["xc"], name="/inp/Clip"),
        n("DequantizeLinear", ["xc", "inp_s", "u8_0"], ["x"], name="/inp/DequantizeLinear"),
        n("Clip", ["conv_w", "i8_m1", "i8_1"], ["cw"], name="/conv/weight_quant/Clip"),
        n("DequantizeLinear", ["cw", "conv_s", "i8_0"], ["cwd"], name="/conv/weight_quant/DequantizeLinear"),
        n("Conv", ["x", "cwd"], ["conv"], name="/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Relu", ["conv"], ["r1"], name="/relu/Relu"),
        n("QuantizeLinear", ["r1", "a1_s", "u8_0"], ["r1q"], name="/relu/QuantizeLinear"),
        n("Clip", ["r1q", "u8_0", "u8_3"], ["r1c"], name="/relu/Clip"),
        n("DequantizeLinear", ["r1c", "a1_s", "u8_0"], ["a1"], name="/relu/DequantizeLinear"),
        n("Flatten", ["a1"], ["flat"], name="/Flatten", axis=1),
        n("Clip", ["fc_w", "i8_m1", "i8_1"], ["fw"], name="/fc/weight_quant/Clip"),
        n("DequantizeLinear", ["fw", "fc_s", "fc_zp"], ["fwd"], name="/fc/weight_quant/DequantizeLinear", axis=0),
        n("Transpose", ["fwd"], ["fwt"], name="/fc/Transpose", perm=[1, 1] if bad_perm else [1, 0]),
        n("MatMul", ["flat", "fwt"], ["fc"], name="/fc/MatMul"),
        n("Relu", ["fc"], ["r2"], name="/relu2/Relu"),
        n("QuantizeLinear", ["r2", "a2_s", "u8_0"], ["r2q"], name="/relu2/QuantizeLinear"),
        n("Clip", ["r2q", "u8_0", "u8_3"], ["r2c"], name="/relu2/Clip"),
        n("DequantizeLinear", ["r2c", "a2_s", "u8_0"], ["a2"], name="/relu2/DequantizeLinear"),
        n("Transpose", ["out_w"], ["owt"], name="/out/weight_quant/Transpose", perm=[1, 0]),
        n("Clip", ["owt", "i8_m3", "i8_3"], ["owc"], name="/out/weight_quant/Clip"),
        n("DequantizeLinear", ["owc", "out_s", "i8_0"], ["owd"], name="/out/weight_quant/DequantizeLinear"),
        n("MatMul", ["a2", "owd"], ["logits"], name="/out/MatMul"),
    ]
    return graph_model(nodes, init, "qcdq_nobias_pow2", check=not bad_perm)


def float_weights(xtr, ytr):
    wc = FILTERS.astype(np.float32) * 0.25 + np.float32(0.01) * np.arange(72, dtype=np.float32).reshape(8, 1, 3, 3) / 72
    bc = np.linspace(-0.1, 0.1, 8).astype(np.float32)
    f = np.maximum(conv3x3s2(xtr, wc) + bc[None, :, None, None], 0).reshape(len(xtr), -1)
    wf, bf = ridge(f, ytr, 0.1)
    return wc, bc, wf.astype(np.float32), bf


def float_model(wc, bc, wf, bf):
    init = [
        c("conv_w_hwio_x2", (np.transpose(wc, (2, 3, 1, 0)) * 2).astype(np.float32)),
        c("conv_b_1x8", bc.reshape(1, 8)),
        c("fc_w_flat_x2", (wf * 2).reshape(-1).astype(np.float32)),
        c("two", np.float32(2.0)),
        c("fc_b_f64", bf.astype(np.float64)),
    ]
    n = helper.make_node
    nodes = [
        n("Constant", [], ["half"], name="/conv/half", value=c("half_t", np.float32(0.5))),
        n("Mul", ["conv_w_hwio_x2", "half"], ["cw_hwio"], name="/conv/Mul"),
        n("Transpose", ["cw_hwio"], ["cw"], name="/conv/Transpose", perm=[3, 2, 0, 1]),
        n("Constant", [], ["axes0"], name="/conv/axes", value=c("axes_t", np.array([0], np.int64))),
        n("Squeeze", ["conv_b_1x8", "axes0"], ["cb"], name="/conv/Squeeze"),
        n("Identity", ["cb"], ["cb2"], name="/conv/Identity"),
        n("Conv", ["input", "cw", "cb2"], ["conv"], name="/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Relu", ["conv"], ["r"], name="/relu/Relu"),
        n("Flatten", ["r"], ["flat"], name="/Flatten", axis=1),
        n("Constant", [], ["shape"], name="/fc/shape", value=c("shape_t", np.array([10, 128], np.int64))),
        n("Reshape", ["fc_w_flat_x2", "shape"], ["fw2"], name="/fc/Reshape"),
        n("Div", ["fw2", "two"], ["fw"], name="/fc/Div"),
        n("Transpose", ["fw"], ["fwt"], name="/fc/Transpose", perm=[1, 0]),
        n("MatMul", ["flat", "fwt"], ["mm"], name="/fc/MatMul"),
        n("Cast", ["fc_b_f64"], ["fb"], name="/fc/Cast", to=TensorProto.FLOAT),
        n("Add", ["mm", "fb"], ["logits"], name="/fc/Add"),
    ]
    return graph_model(nodes, init, "float_folds")


def plain_nobias_model(wc, wf):
    """conv 1->8 3x3/2 -> ReLU -> dense 128->10, neither with a bias: the float model ONNX
    Runtime's static quantization turns into ort_qdq_nobias."""
    init = [c("conv_w", wc), c("fc_w_t", np.ascontiguousarray(wf.T).astype(np.float32))]
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "conv_w"], ["conv"], name="/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Relu", ["conv"], ["r"], name="/relu/Relu"),
        n("Flatten", ["r"], ["flat"], name="/Flatten", axis=1),
        n("MatMul", ["flat", "fc_w_t"], ["logits"], name="/fc/MatMul"),
    ]
    return graph_model(nodes, init, "plain_nobias")


class Calibration(CalibrationDataReader):
    """ONNX Runtime's calibration data: the first 300 training images (calib_x.npy)."""

    def __init__(self, x):
        self.batches = iter([{"input": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.batches, None)


def ort_quantized(model, calib):
    """ONNX Runtime's static quantization of `model` in QDQ format (uint8 activations, int8
    weights per tensor), as a model owner runs it."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "float.onnx"), os.path.join(d, "qdq.onnx")
        onnx.save(model, src)
        quantize_static(src, dst, Calibration(calib), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(dst)


def graph_model(nodes, init, name, check=True):
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    g = helper.make_graph(nodes, name, [inp], [out], init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)],
                          producer_name="scripts/fold-fixtures.py")
    if check:
        onnx.checker.check_model(m, full_check=True)
    return m


def ort_predictions(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [int(np.argmax(s.run(None, {"input": x[i:i + 1]})[0])) for i in range(len(x))]


def main():
    xtr, ytr, xte, yte = split(*load_digits(DIGITS))
    w1, s1, w2 = qcdq_weights(xtr, ytr)
    models = {
        "qcdq_nobias_pow2": qcdq_model(w1, s1, w2),
        "float_folds": float_model(*float_weights(xtr, ytr)),
    }
    wc, _, wf, _ = float_weights(xtr, ytr)
    models["ort_qdq_nobias"] = ort_quantized(plain_nobias_model(wc, wf), xtr[:300])
    record = {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
    for name, m in models.items():
        onnx.save(m, os.path.join(OUT, f"{name}.onnx"))
        pred = ort_predictions(m, xte)
        acc = float(np.mean(np.array(pred) == yte))
        record[name] = {"accuracy": acc, "predictions": pred}
        print(f"{name}: ONNX Runtime test accuracy {acc:.4f}")
    bad = qcdq_model(w1, s1, w2, bad_perm=True)
    onnx.save(bad, os.path.join(OUT, "fold_bad_perm.onnx"))
    with open(os.path.join(OUT, "fold_predictions.json"), "w") as f:
        json.dump(record, f)
        f.write("\n")


if __name__ == "__main__":
    main()
