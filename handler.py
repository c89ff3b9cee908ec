"""TorchServe entry point of a guarded archive (`layerguard wrap` ships it as layerguard_handler.py).

TorchServe instantiates the one class defined here and calls initialize(context) and handle(data,
context); all the work is in layerguard.serving, which wraps the archive's original handler.
"""

from layerguard.serving import LayerGuardHandler


class GuardedHandler(LayerGuardHandler):
    """The handler class TorchServe finds in this module (it must be defined here, not imported)."""
