"""Softmax followed by a squared-error loss: the VJP passes a gradient check, the shortcut fails.

The setting of the question this project grew from: a network library gives every activation
and every loss a derivative, and computes the output layer's gradient as "loss derivative times
activation derivative", elementwise. For softmax that derivative would be ``y * (1 - y)``, the
diagonal of its Jacobian only: softmax couples every output to every input, so the elementwise
product drops the off-diagonal terms ``-y_i * y_j``. The fix is to pass the loss gradient
*through* the softmax Jacobian, the vector-Jacobian product ``y * (dy - sum(y * dy))``, which is
what ``Softmax.backward`` does.

This script builds ``logits -> Softmax -> SquaredError``, computes d(loss)/d(logits) both ways,
and checks each with :func:`xpsoftmax.check_vjp` (central finite differences in float64). It
prints both results and exits 0 when the VJP passes and the elementwise shortcut fails.

Needs only xpsoftmax itself (``python -m pip install .``); the other example, ``train_digits.py``,
needs the examples' extra (``python -m pip install ".[examples]"``).
"""

from __future__ import annotations

import sys

import numpy as np

import xpsoftmax
from xpsoftmax.losses import SquaredError


def main() -> int:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 5))
    target = np.eye(5)[rng.integers(0, 5, size=8)]  # one-hot targets, as in the question
    # reduction="none": the elementwise losses, an output of the logits' shape, which is what
    # check_vjp differentiates (with random upstream gradients dloss of that shape).
    act, loss = xpsoftmax.Softmax(), SquaredError(reduction="none")

    def loss_of_logits(z, axis=-1):
        return loss.forward(act.forward(z), target)

    def vjp_through_softmax(_loss, dloss, axis=-1):
        loss_of_logits(logits)  # restore the layers' state at the checked point
        return act.backward(loss.backward(dloss))

    def elementwise_shortcut(_loss, dloss, axis=-1):
        loss_of_logits(logits)
        y = act.output
        return y * (1.0 - y) * loss.backward(dloss)

    vjp_ok = xpsoftmax.check_vjp(loss_of_logits, vjp_through_softmax, logits)
    shortcut_ok = xpsoftmax.check_vjp(loss_of_logits, elementwise_shortcut, logits)

    # The gradient of the summed loss both ways, to show how far apart they are.
    right = vjp_through_softmax(None, np.ones_like(logits))
    wrong = elementwise_shortcut(None, np.ones_like(logits))
    off = np.linalg.norm(wrong - right) / np.linalg.norm(right)
    print("logits (8 x 5) -> Softmax -> SquaredError, gradient d(loss)/d(logits):")
    print(f"  VJP, act.backward(loss.backward()):  check_vjp {'passed' if vjp_ok else 'FAILED'}")
    print(
        f"  elementwise y*(1-y)*loss.backward(): check_vjp {'passed' if shortcut_ok else 'FAILED'}"
        f" (off by {100 * off:.1f} % of the true gradient's norm)"
    )
    return 0 if vjp_ok and not shortcut_ok else 1


if __name__ == "__main__":
    sys.exit(main())
