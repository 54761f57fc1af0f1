"""Trains small float CNNs on the digits data set with PyTorch and exports them with
torch.onnx.export, the way model owners do; `fhecam import` is tested on the result.

Run through scripts/onnx-fixtures.sh (it installs Debian's python3-torch and fetches the data).
Writes into tests/fixtures/onnx/:
  digits_bn.onnx        conv -> BatchNorm -> ReLU -> dense                     (opset 13)
  digits_res.onnx       conv -> ReLU -> residual block (conv, BN, add) -> ReLU
                        -> max pool -> dense                                   (opset 17)
  digits_tanh.onnx      conv -> Tanh -> average pool -> dense -> Sigmoid -> dense (opset 15)
  digits_keras.onnx     laid out as tf2onnx writes Keras models: NHWC input, Transposes,
                        MatMul + Add, final Softmax                            (opset 13)
  digits_gelu.onnx      uses GELU (an operator fhecam does not import)         (opset 13)
  calib_x.npy / calib_y.txt   300 training images, float32 (N, 1, 8, 8), intensities in [0, 1]
  test_x.npy  / test_y.txt    the 450 held-out test images
  float_accuracy.json   float test accuracy of each model as PyTorch computed it
"""

import json
import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_data import load_digits, split  # noqa: E402

OUT = sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/onnx"
DIGITS = sys.argv[1] if len(sys.argv) > 1 else ".cache/data/digits.csv.gz"


class BN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(x, 1))


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2, stride=1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(4 * 3 * 3, 10)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        h = self.pool(h)
        return self.fc(self.drop(h.flatten(1)))


class Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(4 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        h = self.pool(torch.tanh(self.conv(x)))
        h = torch.sigmoid(self.fc1(h.flatten(1)))
        return self.fc2(h)


class Keras(nn.Module):
    """Laid out as tf2onnx writes a Keras model: (N, H, W, C) input, transposes around the
    convolution, a flatten in (H, W, C) order, MatMul + Add, a final Softmax."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.w = nn.Parameter(torch.randn(64, 10) * 0.1)
        self.b = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        h = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
        h = h.permute(0, 2, 3, 1).reshape(-1, 64)
        return torch.softmax(h @ self.w + self.b, dim=1)


class Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(nn.functional.gelu(x.flatten(1)))


def train(model, x, y, epochs=80, seed=0, probs=False):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            out = model(xt[idx])
            if probs:
                loss = nn.functional.nll_loss(torch.log(out + 1e-9), yt[idx])
            else:
                loss = nn.functional.cross_entropy(out, yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    return model


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model, path, opset, shape=(1, 1, 8, 8)):
    # PRESERVE keeps BatchNormalization nodes (EVAL mode would fuse them into the Conv at
    # export): fhecam's own folding is what the BN fixtures test.
    torch.onnx.export(
        model,
        torch.zeros(*shape),
        path,
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def main():
    os.makedirs(OUT, exist_ok=True)
    x, y = load_digits(DIGITS)
    xtr, ytr, xte, yte = split(x, y)
    np.save(os.path.join(OUT, "calib_x.npy"), xtr[:300])
    np.savetxt(os.path.join(OUT, "calib_y.txt"), ytr[:300], fmt="%d")
    np.save(os.path.join(OUT, "test_x.npy"), xte)
    np.savetxt(os.path.join(OUT, "test_y.txt"), yte, fmt="%d")
    acc = {}
    torch.manual_seed(1)
    for name, cls, opset in [("digits_bn", BN, 13), ("digits_res", Res, 17),
                             ("digits_tanh", Tanh, 15), ("digits_gelu", Gelu, 13)]:
        model = train(cls(), xtr, ytr)
        acc[name] = accuracy(model, xte, yte)
        export(model, os.path.join(OUT, name + ".onnx"), opset)
        print(f"{name}: float test accuracy {acc[name]:.4f} (opset {opset})")
    # Keras-style: trained and exported on (N, H, W, C); fhecam's data stay (N, C, H, W)
    nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    model = train(Keras(), nhwc(xtr), ytr, probs=True)
    acc["digits_keras"] = accuracy(model, nhwc(xte), yte)
    export(model, os.path.join(OUT, "digits_keras.onnx"), 13, shape=(1, 8, 8, 1))
    print(f"digits_keras: float test accuracy {acc['digits_keras']:.4f} (opset 13, NHWC)")
    with open(os.path.join(OUT, "float_accuracy.json"), "w") as f:
        json.dump({"torch": torch.__version__, "test_samples": len(yte), "accuracy": acc}, f, indent=1)


if __name__ == "__main__":
    main()
