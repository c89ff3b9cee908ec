#!/usr/bin/env python3
"""Calibrate layerguard on benign reference images: `python calibrate.py --help`."""

import sys

from layerguard.cli import main

if __name__ == "__main__":
    sys.exit(main())
