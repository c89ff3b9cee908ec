"""`python -m layerguard.demo` (what `make demo` runs): see layerguard/demo/run.py."""

import sys

from .run import main

__all__ = []

if __name__ == "__main__":
    sys.exit(main())
