"""The command-line tools: ``xpsoftmax demo|info|kernels|run|bench`` (``cli.py``).

They use the library through its public functions (plus the kernel check's list of kernels in
``backends/cuda``); the library never imports them (``tests/test_architecture.py``).
"""
