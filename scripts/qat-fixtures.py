"""Quantization-aware-trained (QAT) and statically quantized ONNX fixtures, made the way
Brevitas and PyTorch / ONNX Runtime users make them; `fhecam import` is tested on the result
(issue 16).

Run through scripts/qat-fixtures.sh (it installs Debian's python3-torch, Brevitas and ONNX
Runtime into .cache/qat-venv and fetches the data). Uses the train / test split of
scripts/onnx-fixtures.py (and checks that it reproduces the committed test_x.npy and
calib_x.npy). Writes into tests/fixtures/onnx/:
  qat_cnn_3bit.onnx   Brevitas QAT CNN: QuantIdentity (8-bit) -> QuantConv2d(1->8, 3x3, stride 2,
                      pad 1; 3-bit weights per tensor, int32 bias) -> QuantReLU (3-bit) -> flatten
                      -> QuantLinear(128->10; 3-bit weights, int32 bias); export_onnx_qcdq, opset 13
  qat_cnn_2bit.onnx   the same at 2 bits, weights quantized per output channel
  qat_mlp_3bit.onnx   Brevitas QAT MLP: flatten -> QuantIdentity (8-bit) -> QuantLinear(64->32)
                      -> QuantReLU (3-bit) -> QuantLinear(32->10); 3-bit weights per tensor, float
                      biases (Brevitas' default); export_onnx_qcdq, opset 13
  ort_qdq_bn.onnx     ONNX Runtime static quantization (QDQ format, per-channel int8 weights,
                      int8 activations, MinMax calibration on calib_x.npy) of digits_bn.onnx,
                      after ONNX Runtime's quantization pre-processing (which folds the BN);
                      the quantizer drops the Relu (the QuantizeLinear after the Conv, zero
                      point -128, clamps at 0) and quantizes the logits too
  qat_accuracy.json   each fixture's test accuracy as ONNX Runtime computes it on the file itself
"""

import json
import os
import random
import sys
import tempfile

import numpy as np
import torch
from torch import nn

import brevitas
import brevitas.nn as qnn
from brevitas.export import export_onnx_qcdq
from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat, Int32Bias
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

OUT = sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/onnx"
DIGITS = sys.argv[1] if len(sys.argv) > 1 else ".cache/data/digits.csv.gz"


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_data import load_digits, split  # noqa: E402


class QatCnn(nn.Module):
    def __init__(self, bits, channels=8, per_channel=False):
        super().__init__()
        weight_quant = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
        self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(1, channels, 3, stride=2, padding=1, bias=True,
                                    weight_quant=weight_quant, weight_bit_width=bits,
                                    bias_quant=Int32Bias)
        self.relu = qnn.QuantReLU(bit_width=bits, return_quant_tensor=True)
        self.fc = qnn.QuantLinear(channels * 4 * 4, 10, bias=True, weight_quant=weight_quant,
                                  weight_bit_width=bits, bias_quant=Int32Bias)

    def forward(self, x):
        h = self.relu(self.conv(self.inp(x)))
        return self.fc(torch.flatten(h, 1))


class QatCnnBn(nn.Module):
    """Conv without bias -> float BatchNorm -> QuantReLU -> MaxPool: the BN stays a
    BatchNormalization node between the quantized conv and its activation quantizer."""

    def __init__(self, bits, channels=8):
        super().__init__()
        self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(1, channels, 3, stride=1, padding=1, bias=False,
                                    weight_bit_width=bits)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = qnn.QuantReLU(bit_width=bits, return_quant_tensor=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = qnn.QuantLinear(channels * 4 * 4, 10, bias=True, weight_bit_width=bits,
                                  bias_quant=Int32Bias)

    def forward(self, x):
        h = self.pool(self.relu(self.bn(self.conv(self.inp(x)))))
        return self.fc(torch.flatten(h, 1))


class QatMlp(nn.Module):
    def __init__(self, bits, hidden=32):
        super().__init__()
        self.inp = qnn.QuantIdentity(bit_width=8)
        self.fc1 = qnn.QuantLinear(64, hidden, bias=True, weight_bit_width=bits)
        self.relu = qnn.QuantReLU(bit_width=bits)
        self.fc2 = qnn.QuantLinear(hidden, 10, bias=True, weight_bit_width=bits)

    def forward(self, x):
        h = self.inp(torch.flatten(x, 1))
        return self.fc2(self.relu(self.fc1(h)))


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model, x, y, epochs, seed, lr=0.01):
    seed_all(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def torch_accuracy(model, x, y):
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def onnx_predictions(path, x):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x})[0].argmax(1)


def onnx_accuracy(path, x, y):
    return float((onnx_predictions(path, x) == y).mean())


class FloatCnn(nn.Module):
    """QatCnn's architecture in float, for post-training import at fhecam's default widths."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.fc = nn.Linear(channels * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def export_qcdq(model, path):
    export_onnx_qcdq(model, torch.zeros(1, 1, 8, 8), export_path=path, opset_version=13,
                     input_names=["input"], output_names=["logits"],
                     dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(path))


class CalibReader(CalibrationDataReader):
    def __init__(self, x, input_name, batch=1):
        self.batches = iter([{input_name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def ort_static_qdq(src, dst, calib_x):
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        # ONNX Runtime's recommended pre-processing: shape inference and graph optimisation
        # (here it folds the BatchNormalization into the Conv before quantization).
        quant_pre_process(src, pre)
        input_name = onnx.load(pre).graph.input[0].name
        quantize_static(pre, dst, CalibReader(calib_x, input_name),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    onnx.checker.check_model(onnx.load(dst))


def refusal_fixtures(src):
    """Three broken variants of a QCDQ model that `fhecam import` must refuse by name:
    an operator it does not read between quantizers (Softsign), a 16-bit activation
    quantizer (uint16 zero point), and a uint8 zero point stored as 300."""
    from onnx import helper, TensorProto, numpy_helper

    def relu_q(model):
        # the QuantizeLinear after the Relu, and its zero point initializer
        g = model.graph
        relu = next(n for n in g.node if n.op_type == "Relu")
        q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == relu.output[0])
        return g, relu, q

    m = onnx.load(src)
    g, relu, _ = relu_q(m)
    relu.op_type = "Softsign"
    onnx.save(m, os.path.join(OUT, "qdq_softsign.onnx"))

    m = onnx.load(src)
    g, _, q = relu_q(m)
    zp = onnx.helper.make_tensor("zp_u16", TensorProto.UINT16, [], [0])
    g.initializer.append(zp)
    q.input[2] = "zp_u16"
    # the Clip after it keeps its uint8 bounds: fhecam must refuse before reading them
    onnx.save(m, os.path.join(OUT, "qdq_16bit.onnx"))

    m = onnx.load(src)
    g, _, q = relu_q(m)
    zp = TensorProto()
    zp.name = "zp_300"
    zp.data_type = TensorProto.UINT8
    zp.int32_data.append(300)  # uint8 is stored widened: 300 does not fit
    g.initializer.append(zp)
    q.input[2] = "zp_300"
    onnx.save(m, os.path.join(OUT, "qdq_bad_zero_point.onnx"))


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    x, y = load_digits(DIGITS)
    xtr, ytr, xte, yte = split(x, y)
    # The committed evaluation data must be what this split gives.
    assert np.array_equal(np.load(os.path.join(OUT, "test_x.npy")), xte), "test_x.npy differs"
    assert np.array_equal(np.loadtxt(os.path.join(OUT, "test_y.txt"), dtype=np.int64), yte)
    calib_x = np.load(os.path.join(OUT, "calib_x.npy"))
    assert np.array_equal(calib_x, xtr[:300]), "calib_x.npy differs"

    entries = {}
    qat = [
        ("qat_cnn_3bit", lambda: QatCnn(3), 3, 3, 1,
         "Brevitas QAT CNN: QuantIdentity(8b) -> QuantConv2d(1->8, 3x3, s2, p1) -> QuantReLU(3b) "
         "-> flatten -> QuantLinear(128->10); 3-bit per-tensor weights, int32 biases; "
         "export_onnx_qcdq opset 13"),
        ("qat_cnn_2bit", lambda: QatCnn(2, per_channel=True), 2, 2, 2,
         "Brevitas QAT CNN: QuantIdentity(8b) -> QuantConv2d(1->8, 3x3, s2, p1) -> QuantReLU(2b) "
         "-> flatten -> QuantLinear(128->10); 2-bit per-output-channel weights, int32 biases; "
         "export_onnx_qcdq opset 13"),
        ("qat_cnn_bn_3bit", lambda: QatCnnBn(3), 3, 3, 4,
         "Brevitas QAT CNN with BatchNorm and max pooling: QuantIdentity(8b) -> "
         "QuantConv2d(1->8, 3x3, s1, p1, no bias) -> BatchNorm2d -> QuantReLU(3b) -> MaxPool2d(2) "
         "-> flatten -> QuantLinear(128->10); 3-bit per-tensor weights; export_onnx_qcdq opset 13"),
        ("qat_mlp_3bit", lambda: QatMlp(3), 3, 3, 3,
         "Brevitas QAT MLP: flatten -> QuantIdentity(8b) -> QuantLinear(64->32) -> QuantReLU(3b) "
         "-> QuantLinear(32->10); 3-bit per-tensor weights, float biases; "
         "export_onnx_qcdq opset 13"),
    ]
    for name, make, wbits, abits, seed, desc in qat:
        seed_all(seed)
        model = train(make(), xtr, ytr, epochs=40, seed=seed)
        path = os.path.join(OUT, name + ".onnx")
        export_qcdq(model, path)
        acc = onnx_accuracy(path, xte, yte)
        entries[name] = {"accuracy": acc, "brevitas_accuracy": torch_accuracy(model, xte, yte),
                         "weight_bits": wbits, "activation_bits": abits, "input_bits": 8,
                         "opset": 13, "description": desc}
        print(f"{name}: ONNX Runtime test accuracy {acc:.4f} "
              f"(Brevitas {entries[name]['brevitas_accuracy']:.4f})")

    path = os.path.join(OUT, "ort_qdq_bn.onnx")
    ort_static_qdq(os.path.join(OUT, "digits_bn.onnx"), path, calib_x)
    acc = onnx_accuracy(path, xte, yte)
    entries["ort_qdq_bn"] = {
        "accuracy": acc, "float_accuracy": onnx_accuracy(os.path.join(OUT, "digits_bn.onnx"), xte, yte),
        "weight_bits": 8, "activation_bits": 8, "input_bits": 8,
        "opset": onnx.load(path).opset_import[0].version,
        "description": "ONNX Runtime quantize_static of digits_bn.onnx (after quant_pre_process): "
                       "QDQ format, per-channel int8 weights, int8 activations, int32 biases, "
                       "MinMax calibration on calib_x.npy; BN folded into the Conv, Relu dropped "
                       "(absorbed by the following QuantizeLinear), logits quantized"}
    print(f"ort_qdq_bn: ONNX Runtime test accuracy {acc:.4f}")

    # the same architecture as qat_cnn_3bit, trained in float (torch.onnx.export)
    seed_all(1)
    fmodel = train(FloatCnn(), xtr, ytr, epochs=40, seed=1)
    fmodel.eval()
    path = os.path.join(OUT, "float_cnn.onnx")
    torch.onnx.export(fmodel, torch.zeros(1, 1, 8, 8), path, opset_version=13,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    acc = onnx_accuracy(path, xte, yte)
    entries["float_cnn"] = {"accuracy": acc, "opset": 13,
                            "description": "qat_cnn_3bit's architecture trained in float: "
                                           "Conv2d(1->8, 3x3, s2, p1) -> ReLU -> flatten -> "
                                           "Linear(128->10); torch.onnx.export opset 13"}
    print(f"float_cnn: ONNX Runtime test accuracy {acc:.4f}")

    refusal_fixtures(os.path.join(OUT, "qat_cnn_3bit.onnx"))

    # each fixture's own predictions on the test images, by ONNX Runtime: what the integer
    # model is checked against
    preds = {name: onnx_predictions(os.path.join(OUT, name + ".onnx"), xte).tolist()
             for name in entries}
    with open(os.path.join(OUT, "qat_predictions.json"), "w") as f:
        json.dump(preds, f)
        f.write("\n")

    with open(os.path.join(OUT, "qat_accuracy.json"), "w") as f:
        json.dump({"torch": torch.__version__, "brevitas": brevitas.__version__,
                   "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                   "test_samples": len(yte), "fixtures": entries}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
