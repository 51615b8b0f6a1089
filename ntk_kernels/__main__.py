"""``python -m ntk_kernels``: the ``ntk-kernels`` command line (ntk_kernels.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
