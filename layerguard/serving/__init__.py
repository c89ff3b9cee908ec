"""What a TorchServe worker runs: the guard handler, its policy, the inner handler loader, input errors and
metrics. Imports only `layerguard.core` (and torch, numpy, pillow, pyyaml, ts); a guarded archive ships these
two packages and nothing else of layerguard."""

__all__ = ["entry", "handler", "inner", "inputs", "metrics", "policy"]
