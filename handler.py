"""TorchServe entry point of a guarded archive (`layerguard wrap` ships this file as layerguard_handler.py).

TorchServe calls the module-level `handle(data, context)`; the work is in layerguard.serving, which wraps
the archive's original handler.
"""

from layerguard.serving.entry import handle  # noqa: F401
