"""The digits data as every fixture generator (scripts/*-fixtures.py) and the QAT recipe
(examples/qat/train_digits.py) read it, so that their figures compare: scikit-learn's 8x8
digits (scripts/setup.sh extracts digits.csv.gz), intensities 0..16 scaled to [0, 1], and
one fixed split of 450 test images (tests/fixtures/onnx/test_x.npy; calib_x.npy is the
first 300 training images)."""

import gzip

import numpy as np

TEST_IMAGES = 450


def load_digits(path):
    """(x, y): images as float32 (N, 1, 8, 8) in [0, 1], labels as int64."""
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = (rows[:, :64] / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    y = rows[:, 64].astype(np.int64)
    return x, y


def split(x, y):
    """(x_train, y_train, x_test, y_test): a fixed permutation, its first 450 for testing."""
    perm = np.random.default_rng(7).permutation(len(x))
    test, train_idx = perm[:TEST_IMAGES], perm[TEST_IMAGES:]
    return x[train_idx], y[train_idx], x[test], y[test]
