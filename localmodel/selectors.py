"""Kubernetes node selectors (a PV's ``nodeAffinity.required``), matched as the scheduler does.

Terms are ORed; within a term every ``matchExpressions`` and ``matchFields`` requirement must hold.
Operators: In, NotIn, Exists, DoesNotExist, Gt, Lt (Gt/Lt compare integers; a label that is not an
integer does not match). ``matchFields`` supports ``metadata.name``, the only field Kubernetes allows.
An empty term matches nothing, as in Kubernetes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from localmodel.errors import SpecError

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any, path: str) -> Requirement:
        if not isinstance(data, Mapping):
            raise SpecError("expected an object with key, operator, values", field=path)
        key, op, values = data.get("key"), data.get("operator"), data.get("values") or []
        if not isinstance(key, str) or not key:
            raise SpecError("is required", field=f"{path}.key")
        if op not in OPERATORS:
            raise SpecError(f"{op!r} is not one of {', '.join(OPERATORS)}", field=f"{path}.operator")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise SpecError("expected a list of strings", field=f"{path}.values")
        if op in ("In", "NotIn") and not values:
            raise SpecError(f"operator {op} needs at least one value", field=f"{path}.values")
        if op in ("Exists", "DoesNotExist") and values:
            raise SpecError(f"operator {op} takes no values", field=f"{path}.values")
        if op in ("Gt", "Lt") and (len(values) != 1 or not _is_int(values[0])):
            raise SpecError(f"operator {op} needs exactly one integer", field=f"{path}.values")
        return cls(key, op, tuple(values))

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.operator:
            case "In":
                return present and value in self.values
            case "NotIn":
                return not present or value not in self.values
            case "Exists":
                return present
            case "DoesNotExist":
                return not present
            case "Gt" | "Lt":
                if value is None or not _is_int(value):
                    return False
                a, b = int(value), int(self.values[0])
                return a > b if self.operator == "Gt" else a < b
        return False  # pragma: no cover - operators are checked on parse

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "operator": self.operator}
        if self.values:
            out["values"] = list(self.values)
        return out


@dataclass(frozen=True)
class Term:
    expressions: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()

    def matches(self, name: str, labels: Mapping[str, str]) -> bool:
        if not self.expressions and not self.fields:
            return False
        return all(r.matches(labels) for r in self.expressions) and all(
            r.matches({"metadata.name": name}) for r in self.fields
        )


@dataclass(frozen=True)
class NodeSelector:
    terms: tuple[Term, ...]

    @classmethod
    def from_json(cls, data: Any) -> NodeSelector:
        if not isinstance(data, Mapping):
            raise SpecError("expected an object with nodeSelectorTerms")
        raw_terms = data.get("nodeSelectorTerms")
        if not isinstance(raw_terms, list) or not raw_terms:
            raise SpecError("needs at least one term", field="nodeSelectorTerms")
        terms = []
        for i, raw in enumerate(raw_terms):
            path = f"nodeSelectorTerms[{i}]"
            if not isinstance(raw, Mapping):
                raise SpecError("expected an object", field=path)
            exprs = raw.get("matchExpressions") or []
            fields = raw.get("matchFields") or []
            if not isinstance(exprs, list) or not isinstance(fields, list):
                raise SpecError("expected lists", field=path)
            parsed_fields = tuple(
                Requirement.from_json(r, f"{path}.matchFields[{j}]") for j, r in enumerate(fields)
            )
            for j, r in enumerate(parsed_fields):
                if r.key != "metadata.name":
                    raise SpecError(
                        f"only metadata.name is supported, got {r.key!r}",
                        field=f"{path}.matchFields[{j}].key",
                    )
            terms.append(
                Term(
                    tuple(
                        Requirement.from_json(r, f"{path}.matchExpressions[{j}]") for j, r in enumerate(exprs)
                    ),
                    parsed_fields,
                )
            )
        return cls(tuple(terms))

    def matches(self, name: str, labels: Mapping[str, str]) -> bool:
        return any(t.matches(name, labels) for t in self.terms)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
