"""Kubernetes label selectors (`matchLabels` + `matchExpressions`), parsed once, matched many times."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imagewarm.errors import ImagewarmError

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class InvalidSelector(ImagewarmError, ValueError):
    """A selector that Kubernetes itself would reject; the message names the bad part."""


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values  # NotIn


@dataclass(frozen=True)
class LabelSelector:
    """All requirements must hold. `empty` is a selector with none (Kubernetes: matches everything;
    callers decide what an empty selector means for them)."""

    requirements: tuple[Requirement, ...]

    @property
    def empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    @classmethod
    def parse(cls, value: Any) -> LabelSelector:
        """Parse a `metav1.LabelSelector` object; raises InvalidSelector."""
        if value is None:
            return cls(())
        if not isinstance(value, dict):
            raise InvalidSelector("a selector must be an object with matchLabels/matchExpressions")
        requirements: list[Requirement] = []
        match_labels = value.get("matchLabels")
        match_labels = {} if match_labels is None else match_labels
        if not isinstance(match_labels, dict):
            raise InvalidSelector("matchLabels must be an object of strings")
        for key, val in match_labels.items():
            requirements.append(Requirement(str(key), "In", frozenset([str(val)])))
        expressions = value.get("matchExpressions")
        expressions = [] if expressions is None else expressions
        if not isinstance(expressions, list):
            raise InvalidSelector("matchExpressions must be a list")
        for expression in expressions:
            if not isinstance(expression, dict) or not isinstance(expression.get("key"), str):
                raise InvalidSelector("each matchExpression needs a key")
            operator = expression.get("operator")
            values = expression.get("values") or []
            if operator not in OPERATORS:
                raise InvalidSelector(f"operator {operator!r} is not one of {', '.join(OPERATORS)}")
            if not isinstance(values, list):
                raise InvalidSelector("matchExpression values must be a list")
            if operator in ("In", "NotIn") and not values:
                raise InvalidSelector(f"operator {operator} needs values")
            if operator in ("Exists", "DoesNotExist") and values:
                raise InvalidSelector(f"operator {operator} takes no values")
            requirements.append(Requirement(expression["key"], operator, frozenset(map(str, values))))
        return cls(tuple(requirements))
