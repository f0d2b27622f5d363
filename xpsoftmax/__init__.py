"""xpsoftmax: softmax and log-softmax with forward, backward (VJP), JVP and Jacobian on every
array-API backend (NumPy, CuPy, PyTorch, JAX, Dask, array-api-strict), plus fused CUDA kernels.
"""

from . import losses
from ._config import get_kernels, kernels, set_kernels
from .nn import LogSoftmax, Softmax
from .ops.checks import check_vjp, softmax_jacobian
from .ops.cross_entropy import cross_entropy, cross_entropy_backward
from .ops.logsumexp import logsumexp, logsumexp_backward
from .ops.softmax import (
    log_softmax,
    log_softmax_backward,
    log_softmax_jvp,
    softmax,
    softmax_backward,
    softmax_jvp,
    softmin,
)

__version__ = "0.1.0"

__all__ = [
    "LogSoftmax",
    "Softmax",
    "__version__",
    "check_vjp",
    "cross_entropy",
    "cross_entropy_backward",
    "get_kernels",
    "kernels",
    "log_softmax",
    "log_softmax_backward",
    "log_softmax_jvp",
    "logsumexp",
    "logsumexp_backward",
    "losses",
    "set_kernels",
    "softmax",
    "softmax_backward",
    "softmax_jacobian",
    "softmax_jvp",
    "softmin",
]
