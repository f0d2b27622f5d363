"""Train a small softmax classifier on scikit-learn's bundled digits with xpsoftmax's layers.

The network is ``Dense(64 -> 64) -> tanh -> Dense(64 -> 10) -> Softmax``, trained with the
``CrossEntropy`` loss on the softmax probabilities. The gradient flows back as in any
hand-written network: the loss gives d(loss)/d(probabilities), and the softmax layer passes it
*through* its Jacobian (the VJP), ``dlogits = softmax.backward(loss.backward())``.

Before training, the script checks on the first batch that

* the softmax layer's backward is a correct vector-Jacobian product at the batch's logits
  (:func:`xpsoftmax.check_vjp`, central finite differences in float64), and
* the logits' gradient from ``Softmax`` + ``CrossEntropy``, and the fused
  :func:`xpsoftmax.cross_entropy_backward` on the logits, both equal the closed form
  ``(softmax(logits) - onehot) / batch`` written out in plain array code.

Needs scikit-learn, for the data: install the examples' extra, ``python -m pip install
".[examples]"`` in the checkout (or ``pip install scikit-learn``); ``--device gpu`` also needs
CuPy (the ``cuda12`` or ``cuda13`` extra). Without them the script says so in one line and exits
with status 2.

Run ``python examples/train_digits.py`` (NumPy) or ``python examples/train_digits.py --device gpu``
(CuPy). The data ships with scikit-learn, nothing is downloaded; the last line printed is
``test accuracy: 0.xxxx``. The exit status is 1 if a gradient check fails, 2 for a bad option or
a missing dependency.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import xpsoftmax
from xpsoftmax.losses import CrossEntropy


class Dense:
    """``y = x @ w + b`` with its backward pass; keeps the gradients of ``w`` and ``b``."""

    def __init__(self, xp, rng: np.random.Generator, n_in: int, n_out: int) -> None:
        scale = np.sqrt(1.0 / n_in)
        self.w = xp.asarray(rng.normal(0.0, scale, size=(n_in, n_out)))
        self.b = xp.zeros(n_out)
        self.x = self.dw = self.db = None

    def forward(self, x):
        self.x = x
        return x @ self.w + self.b

    def backward(self, dy):
        self.dw = self.x.T @ dy
        self.db = dy.sum(axis=0)
        return dy @ self.w.T


class Tanh:
    def __init__(self, xp) -> None:
        self.xp = xp
        self.y = None

    def forward(self, x):
        self.y = self.xp.tanh(x)
        return self.y

    def backward(self, dy):
        return dy * (1.0 - self.y * self.y)


class Model:
    """The classifier: forward to probabilities, backward from d(loss)/d(probabilities)."""

    def __init__(self, xp, rng: np.random.Generator, n_in: int, n_hidden: int, n_out: int):
        self.hidden = Dense(xp, rng, n_in, n_hidden)
        self.act = Tanh(xp)
        self.out = Dense(xp, rng, n_hidden, n_out)
        self.softmax = xpsoftmax.Softmax(axis=-1)

    def logits(self, x):
        return self.out.forward(self.act.forward(self.hidden.forward(x)))

    def forward(self, x):
        return self.softmax.forward(self.logits(x))

    def backward(self, dprob):
        dlogits = self.softmax.backward(dprob)  # the VJP: dprob passes through the Jacobian
        return self.hidden.backward(self.act.backward(self.out.backward(dlogits)))

    def dense_layers(self):
        return (self.hidden, self.out)


def check_gradients(xp, model: Model, loss: CrossEntropy, x, y) -> bool:
    """The two checks of the module docstring, on one batch."""
    logits = model.logits(x)
    layer = model.softmax

    def forward(z, axis=-1):
        return layer.forward(z)

    def vjp(_probs, dprob, axis=-1):
        layer.forward(logits)  # check_vjp evaluated the layer elsewhere since: restore its state
        return layer.backward(dprob)

    vjp_ok = xpsoftmax.check_vjp(forward, vjp, logits)

    loss.forward(layer.forward(logits), y)
    chained = layer.backward(loss.backward())
    fused = xpsoftmax.cross_entropy_backward(logits, y)
    # The textbook closed form, in plain array code: (softmax(logits) - onehot(y)) / batch.
    e = xp.exp(logits - xp.max(logits, axis=-1, keepdims=True))
    onehot = (xp.arange(logits.shape[-1])[None, :] == y[:, None]).astype(logits.dtype)
    closed = (e / xp.sum(e, axis=-1, keepdims=True) - onehot) / logits.shape[0]
    fused_ok = all(bool(xp.allclose(g, closed, rtol=1e-9, atol=1e-12)) for g in (chained, fused))
    print(f"gradient check, Softmax layer VJP (check_vjp): {'passed' if vjp_ok else 'FAILED'}")
    print(
        "gradient check, Softmax + CrossEntropy == fused cross_entropy_backward "
        f"== (softmax - onehot) / batch: {'passed' if fused_ok else 'FAILED'}"
    )
    return vjp_ok and fused_ok


PROG = "train_digits.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad option: one line on stderr, exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            msg = f"must be a positive {kind.__name__}, got {text!r}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def _missing(what: str, install: str) -> int:
    print(f"{PROG}: error: {what}; {install}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--epochs", type=_positive(int), default=30)
    parser.add_argument("--batch-size", type=_positive(int), default=32)
    parser.add_argument("--lr", type=_positive(float), default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return _missing(
            "needs scikit-learn for the digits data",
            'install the examples\' extra: python -m pip install ".[examples]"',
        )
    if args.device == "gpu":
        try:
            import cupy as xp
        except ImportError:
            return _missing(
                "--device gpu needs CuPy",
                'install it with python -m pip install ".[cuda13]" (or ".[cuda12]")',
            )
        if not xp.is_available():
            return _missing(
                "--device gpu needs a CUDA device, and CuPy sees none",
                "use --device cpu",
            )
    else:
        xp = np

    start = time.perf_counter()
    digits = load_digits()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(digits.target))
    features = digits.data[order] / 16.0  # pixel values 0..16
    labels = digits.target[order]
    n_test = len(labels) // 5
    x_train, y_train = xp.asarray(features[n_test:]), xp.asarray(labels[n_test:])
    x_test, y_test = xp.asarray(features[:n_test]), xp.asarray(labels[:n_test])
    print(f"digits: {len(y_train)} training and {len(y_test)} test images, device {args.device}")

    model = Model(xp, rng, features.shape[1], 64, 10)
    loss = CrossEntropy(reduction="mean")
    if not check_gradients(xp, model, loss, x_train[: args.batch_size], y_train[: args.batch_size]):
        return 1

    velocity = {id(p): xp.zeros_like(p) for d in model.dense_layers() for p in (d.w, d.b)}
    n = len(y_train)
    for epoch in range(args.epochs):
        perm = xp.asarray(rng.permutation(n))
        total = 0.0
        for i in range(0, n, args.batch_size):
            idx = perm[i : i + args.batch_size]
            probs = model.forward(x_train[idx])
            total += float(loss.forward(probs, y_train[idx])) * len(idx)
            model.backward(loss.backward())
            for d in model.dense_layers():
                for p, g in ((d.w, d.dw), (d.b, d.db)):
                    v = velocity[id(p)]
                    v *= 0.9
                    v -= args.lr * g
                    p += v
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}: training loss {total / n:.4f}")

    predicted = xp.argmax(model.forward(x_test), axis=-1)
    accuracy = float(xp.mean(predicted == y_test))
    print(f"time: {time.perf_counter() - start:.2f} s")
    print(f"test accuracy: {accuracy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
