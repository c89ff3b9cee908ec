"""Benchmark code for layerguard: backdoored-model zoo, attacks, data helpers (not in the wheel)."""
