"""Build tooling, run by people and CI, never by a TorchServe worker: reference data, calibration runs,
.mar reading and writing, `layerguard wrap` / `inspect`, the report and the command line."""

__all__ = []
