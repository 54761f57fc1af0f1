"""A CNN that is cheap to encrypt with fhecam, trained quantization-aware with Brevitas on
the digits data and exported with export_onnx_qcdq (docs/IMPORT.md, "Bringing a model that
is cheap to encrypt").

Run through scripts/qat-recipe.sh (it sets up Debian's PyTorch 1.13 and Brevitas 0.13.4 /
ONNX 1.17.0 / ONNX Runtime 1.20.1 in .cache/qat-venv), or with that environment:

    python examples/qat/train_digits.py DIGITS_CSV_GZ --out model.onnx [--no-bias] [variant flags]

The defaults are the recipe: QuantIdentity (3-bit input) -> QuantConv2d(1 -> 24, 4x4, stride 4:
non-overlapping patches, ternary weights) -> QuantReLU (2-bit) -> flatten -> QuantLinear(96 -> 10,
ternary weights), int32 biases, exported with export_onnx_qcdq (opset 13). What makes it cheap
(each choice measured; docs/IMPORT.md has the table and the flags of each variant):
  - fixed power-of-two scales (Brevitas' FixedPoint quantizers with a constant scale): input
    1/4, weights 1/2, activation 1/2, so an activation level is exactly 4 units of the integer
    sum (--act-step 4) on every seed; fhecam's import is then exact, and the activation a read
    of the sum's digits. At 8 units or more the levels of ONNX's QuantizeLinear (ties to even)
    spread over one value more than the engine reads at once, which costs ~12 % more PBS;
  - ternary weights (2-bit narrow range: -1, 0, +1 times the scale) and 2-bit activations:
    each product of the dense layer is one base-4 digit times one, one PBS;
  - a 3-bit input quantizer: every input bit widens the conv's sums, which are carried
    before the activation (2 bits: -12 %, 4 bits: +14 % PBS);
  - one strided convolution on non-overlapping patches, no pooling (pooling runs on
    encrypted activations; a stride costs nothing), then one dense layer;
  - per-tensor weight scales (the output layer needs one scale for all classes: per-channel
    ones are re-quantized by the import onto wider integers).

The data split is scripts/onnx-fixtures.py's (450 test images, a fixed permutation), so
the figures compare with the fixtures in tests/fixtures/onnx/; when --fixtures points at that
folder the split is checked against its test_x.npy / calib_x.npy.

Writes the ONNX file, and with --report a JSON of its ONNX Runtime accuracy and per-image
predictions on the test split (what fhecam's integer model is checked against), and with
--ort-labels the same predictions one per line (`fhecam eval --labels` on them gives the
fraction of images where fhecam predicts ONNX Runtime's class).
"""

import argparse
import json
import os
import sys
import random

import numpy as np
import torch
from torch import nn

import brevitas
import brevitas.nn as qnn
from brevitas.inject.enum import ScalingImplType
from brevitas.export import export_onnx_qcdq
from brevitas.quant import (Int8ActPerTensorFloat, Int8WeightPerTensorFixedPoint,
                            Int8WeightPerTensorFloat, Int32Bias, Uint8ActPerTensorFixedPoint,
                            Uint8ActPerTensorFloat)
import onnx
import onnxruntime as ort

# the data and split of the project's fixtures (scripts/digits_data.py), so figures compare
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from digits_data import load_digits, split  # noqa: E402


def weight_kwargs(kind, bits, const_scale=None):
    """Brevitas weight quantizer for a layer (per tensor; see the module doc). With
    const_scale the power-of-two scale is fixed instead of following the weights' maximum."""
    if const_scale is not None:
        init = const_scale * 2 ** (bits - 1)  # narrow range: scale = init / 2^(bits-1)
        kw = weight_kwargs(kind, bits)
        return dict(kw, weight_scaling_impl_type=ScalingImplType.CONST, weight_scaling_init=init)
    if kind == "pow2":  # fixed point, narrow range: 2 bits = ternary {-1, 0, 1} x 2^k
        return dict(weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=bits)
    if kind == "pow2-wide":  # fixed point, full range: 2 bits = {-2, -1, 0, 1} x 2^k
        return dict(weight_quant=Int8WeightPerTensorFixedPoint, weight_bit_width=bits,
                    weight_narrow_range=False)
    if kind == "float":  # Brevitas' default: a learned float scale, narrow range
        return dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=bits)
    raise ValueError(kind)


def act_kwargs(kind, bits, const_scale=None):
    """Brevitas activation quantizer; with const_scale its power-of-two scale is fixed."""
    if const_scale is not None:
        assert kind == "pow2"
        return dict(act_quant=Uint8ActPerTensorFixedPoint, bit_width=bits,
                    scaling_impl_type=ScalingImplType.CONST, scaling_init=const_scale * 2 ** bits)
    if kind == "pow2":
        return dict(act_quant=Uint8ActPerTensorFixedPoint, bit_width=bits)
    if kind == "float":
        return dict(act_quant=Uint8ActPerTensorFloat, bit_width=bits)
    raise ValueError(kind)


class CheapCnn(nn.Module):
    """QuantIdentity (input) -> QuantConv2d(1 -> C, k x k, stride s, padding p) -> QuantReLU ->
    [MaxPool2d(2) with --layout pool, where the conv has stride 1] -> flatten ->
    QuantLinear(C*side*side -> 10)."""

    def __init__(self, a):
        super().__init__()
        bias = not a.no_bias
        bias_kw = dict(bias_quant=Int32Bias) if bias else {}
        s_in = s_w = s_a = None
        if a.act_step:
            # fixed power-of-two scales: the activation's levels are act_step accumulator units
            # (input scale x weight scale) apart
            s_in, s_w = a.input_max / 2 ** a.input_bits, a.weight_scale
            s_a = a.act_step * s_in * s_w
        self.inp = qnn.QuantIdentity(return_quant_tensor=True,
                                     **act_kwargs(a.input_scale, a.input_bits, s_in))
        stride = a.stride if a.layout == "stride" else 1
        pad = a.kernel // 2 if a.padding < 0 else a.padding
        side = (8 + 2 * pad - a.kernel) // stride + 1
        if a.layout == "pool":
            side //= 2
        self.conv = qnn.QuantConv2d(1, a.channels, a.kernel, stride=stride, padding=pad, bias=bias,
                                    **weight_kwargs(a.weights, a.weight_bits, s_w), **bias_kw)
        self.relu = qnn.QuantReLU(return_quant_tensor=True, **act_kwargs(a.acts, a.act_bits, s_a))
        self.pool = nn.MaxPool2d(2) if a.layout == "pool" else nn.Identity()
        self.fc = qnn.QuantLinear(a.channels * side * side, 10, bias=bias,
                                  **weight_kwargs(a.weights, a.output_weight_bits, s_w), **bias_kw)
        if s_w is not None:
            # a fixed weight scale: start the float weights spread over its levels (PyTorch's
            # default initialisation would round most of the dense layer's weights to 0)
            for layer, bits in ((self.conv, a.weight_bits), (self.fc, a.output_weight_bits)):
                top = (2 ** (bits - 1) - 0.5) * s_w
                nn.init.uniform_(layer.weight, -top, top)

    def forward(self, x):
        h = self.pool(self.relu(self.conv(self.inp(x))))
        return self.fc(torch.flatten(h, 1))


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shift(xb, max_shift):
    """Each image moved by up to max_shift pixels in x and y, zeros shifted in."""
    if max_shift == 0:
        return xb
    out = torch.zeros_like(xb)
    d = torch.randint(-max_shift, max_shift + 1, (len(xb), 2))
    for i, (dy, dx) in enumerate(d.tolist()):
        src = xb[i, :, max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)]
        out[i, :, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
    return out


def train(model, x, y, epochs, seed, lr, augment=0):
    seed_all(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(shift(xt[idx], augment)), yt[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def onnx_predictions(path, x):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)


def scales(path):
    """The exported model's scales (DequantizeLinear inputs), to show that they are powers of two."""
    m = onnx.load(path)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    out = []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[1] in init:
            s = init[n.input[1]].astype(np.float64).ravel()
            out.append((n.name, [float(v) for v in s], bool(np.all(np.log2(s) == np.round(np.log2(s))))))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("digits", help="digits.csv.gz (scripts/setup.sh puts it in .cache/data)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--no-bias", action="store_true", help="conv and dense layers without bias")
    p.add_argument("--weights", choices=["pow2", "pow2-wide", "float"], default="pow2",
                   help="weight quantizer: pow2 = Int8WeightPerTensorFixedPoint (narrow: 2 bits are "
                        "ternary), pow2-wide = the same with narrow_range=False, float = "
                        "Int8WeightPerTensorFloat")
    p.add_argument("--acts", choices=["pow2", "float"], default="pow2",
                   help="QuantReLU quantizer: Uint8ActPerTensorFixedPoint or Uint8ActPerTensorFloat")
    p.add_argument("--input-scale", choices=["pow2", "float"], default="pow2")
    p.add_argument("--weight-bits", type=int, default=2)
    p.add_argument("--output-weight-bits", type=int, default=2, help="the dense (output) layer's")
    p.add_argument("--act-bits", type=int, default=2)
    p.add_argument("--input-bits", type=int, default=3)
    p.add_argument("--channels", type=int, default=24)
    p.add_argument("--act-step", type=float, default=4,
                   help="fix every scale to a power of two so that the activation's levels are this "
                        "many accumulator units apart (0: learn the scales)")
    p.add_argument("--input-max", type=float, default=2.0,
                   help="with --act-step: the input quantizer's range (scale = max / 2^input_bits)")
    p.add_argument("--weight-scale", type=float, default=0.5,
                   help="with --act-step: the weights' scale (ternary weights are -s, 0, s)")
    p.add_argument("--kernel", type=int, default=4, help="the conv's kernel size")
    p.add_argument("--stride", type=int, default=4, help="the conv's stride (--layout stride)")
    p.add_argument("--padding", type=int, default=0,
                   help="the conv's zero padding (-1: kernel // 2)")
    p.add_argument("--layout", choices=["stride", "pool"], default="stride",
                   help="stride: the conv strided (--stride); pool: the conv at stride 1, then MaxPool2d(2)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--augment", type=int, default=0,
                   help="train on images shifted by up to this many pixels (0: as they are)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fixtures", help="tests/fixtures/onnx: check the split against its test_x.npy")
    p.add_argument("--report", help="JSON to add this model to (by its file stem): ONNX Runtime's "
                                    "accuracy and predictions on the test split, and the settings")
    p.add_argument("--ort-labels", help="ONNX Runtime's test predictions, one per line")
    p.add_argument("--test-x", help="also save the test images as a float32 .npy here")
    a = p.parse_args()

    torch.set_num_threads(1)
    x, y = load_digits(a.digits)
    xtr, ytr, xte, yte = split(x, y)
    if a.fixtures:
        assert np.array_equal(np.load(os.path.join(a.fixtures, "test_x.npy")), xte), "test_x.npy differs"
        assert np.array_equal(np.load(os.path.join(a.fixtures, "calib_x.npy")), xtr[:300]), "calib differs"
    if a.test_x:
        np.save(a.test_x, xte)

    seed_all(a.seed)
    model = CheapCnn(a)
    model = train(model, xtr, ytr, a.epochs, a.seed, a.lr, a.augment)
    with torch.no_grad():
        torch_acc = float((model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    export_onnx_qcdq(model, torch.zeros(1, 1, 8, 8), export_path=a.out, opset_version=13,
                     input_names=["input"], output_names=["logits"],
                     dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(a.out))
    pred = onnx_predictions(a.out, xte)
    acc = float((pred == yte).mean())
    sc = scales(a.out)
    print(f"{a.out}: ONNX Runtime test accuracy {acc:.4f} (Brevitas {torch_acc:.4f}), "
          f"{len(yte)} images; scales all powers of two: {all(s[2] for s in sc)}")
    for name, s, pow2 in sc:
        print(f"  {name}: scale {s[0] if len(s) == 1 else s} {'(2^%d)' % round(np.log2(s[0])) if pow2 else ''}")
    if a.ort_labels:
        np.savetxt(a.ort_labels, pred, fmt="%d")
    if a.report:
        # one entry per model, keyed by the ONNX file's stem; other models' entries are kept
        report = {}
        if os.path.exists(a.report):
            with open(a.report) as f:
                report = json.load(f)
        report.update({"torch": torch.__version__, "brevitas": brevitas.__version__,
                       "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                       "test_samples": len(yte)})
        settings = {k: v for k, v in vars(a).items()
                    if k not in ("digits", "out", "fixtures", "report", "ort_labels", "test_x")}
        report.setdefault("models", {})[os.path.splitext(os.path.basename(a.out))[0]] = {
            "accuracy": acc, "brevitas_accuracy": torch_acc, "settings": settings,
            "predictions": pred.tolist()}
        with open(a.report, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")

if __name__ == "__main__":
    main()
