"""The public operations, grouped: the softmax family, cross-entropy, checks (VJP check, Jacobian).

Each public function validates its arguments once into a :class:`~xpsoftmax._call.Call` (or
:class:`~xpsoftmax._call.XentCall`) and runs it through :func:`xpsoftmax.backends.run`.
"""
