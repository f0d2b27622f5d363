"""``python -m xpsoftmax``: the same command as the ``xpsoftmax`` console script."""

from .tools.cli import main

raise SystemExit(main())
