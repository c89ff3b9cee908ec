"""Scoring rules by name. Adding one: a file with a `ScoringRule` subclass and a line in `RULES`."""

from __future__ import annotations

from .base import FitError, LayerStatistics, ScoringRule
from .cosine_loi import CosineLoiRule
from .mahalanobis import MahalanobisRule
from .mahalanobis_diag import MahalanobisDiagRule
from .mahalanobis_spread import MahalanobisSpreadRule
from .mahalanobis_spread_loi import MahalanobisSpreadLoiRule

__all__ = ["DEFAULT_RULE", "RULES", "FitError", "LayerStatistics", "ScoringRule", "create_rule", "parse_rule_options"]

RULES: dict[str, type[ScoringRule]] = {rule.name: rule for rule in (CosineLoiRule, MahalanobisRule,
                                                                     MahalanobisDiagRule, MahalanobisSpreadRule,
                                                                     MahalanobisSpreadLoiRule)}
DEFAULT_RULE = "mahalanobis-spread"


def create_rule(name: str, layer_names: tuple[str, ...], num_classes: int, options: dict | None = None,
                penultimate: str | None = None) -> ScoringRule:
    """An unfitted rule; unknown names and options are refused with the known ones listed."""
    if name not in RULES:
        raise ValueError(f"unknown scoring rule {name!r}; known rules: {', '.join(RULES)}")
    return RULES[name](tuple(layer_names), num_classes, options or {}, penultimate=penultimate)


def parse_rule_options(items: list[str] | None) -> dict[str, str]:
    """`["layers=penultimate", "reference=nearest"]` -> a dict (the CLI's repeatable --rule-option)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--rule-option must look like key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out
