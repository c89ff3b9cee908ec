"""layerguard: flag backdoor-triggered inputs at serving time with layer-wise feature analysis.

Kept import-light on purpose: guarded .mar archives ship this package, and a worker must not pull in
anything beyond torch, numpy, pillow and pyyaml by importing it.
"""

__version__ = "0.2.0"

__all__ = ["__version__"]
