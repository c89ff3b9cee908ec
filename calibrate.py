#!/usr/bin/env python3
"""Calibrate layerguard on benign reference images: `python calibrate.py --help`."""

import sys

from layerguard.tooling.cli import calibrate_main

if __name__ == "__main__":
    sys.exit(calibrate_main())
