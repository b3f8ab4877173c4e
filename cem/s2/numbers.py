"""Every number an RM sends must be one: finite, plausible, and a factor a share (0..1).

Which fields are numbers is read from the schema (the generated models in
``s2python.generated.gen_s2``), as `cem.s2.ids` reads the id fields: every field typed
``float``, ``int`` or a root model of one (``Duration``), at any depth; the walk visits only
fields that hold numbers, so a PowerMeasurement costs a look at each ``values[i].value``.

Values are judged as the RM wrote them (before pydantic's lax parsing turns the strings
``"NaN"`` or ``"-Infinity"`` into floats): NaN, an infinity (``1e400`` is one once parsed) or a
magnitude beyond `sitekit.plausible.MAX_MAGNITUDE` is refused, as is an
``operation_mode_factor`` outside 0..1 (a share of a mode, the schema says; s2-python does not
check it). The session answers INVALID_CONTENT with the field's path in the label.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel, RootModel

from cem.s2.ids import concrete_types
from sitekit.plausible import number_problem

FACTOR = "operation_mode_factor"


@dataclass(frozen=True)
class _Field:
    key: str                           # the JSON key (alias)
    is_number: bool                    # float, int, or a root model of one (Duration)
    nested: type[BaseModel] | None     # a nested schema object (or a list of them)


def _numeric(kind: Any) -> bool:
    if kind in (float, int):
        return True
    if isinstance(kind, type) and issubclass(kind, RootModel):
        return any(t in (float, int) for t in concrete_types(kind.model_fields["root"].annotation))
    return False


@cache
def _fields(model: type[BaseModel]) -> tuple[_Field, ...]:
    """The fields of `model` holding numbers, themselves or deeper down."""
    out = []
    for name, info in model.model_fields.items():
        inner = concrete_types(info.annotation)
        is_number = any(_numeric(t) for t in inner)
        nested = next((t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)
                       and not issubclass(t, RootModel)), None)
        if nested is not None and not _fields(nested):
            nested = None
        if is_number or nested is not None:
            out.append(_Field(info.alias or name, is_number, nested))
    return tuple(out)


def _judge(key: str, value: Any) -> str | None:
    problem = number_problem(value)
    if problem is not None:
        return problem
    if key == FACTOR and isinstance(value, int | float) and not isinstance(value, bool) \
            and not 0 <= value <= 1:
        return f"is {value:g}, outside 0..1 (a share of the operation mode)"
    return None


def number_problem_in(model: type[BaseModel], data: Any, path: str = "") -> str | None:
    """The first number of `data` (JSON of `model`) that is none, as "path: what" (None: all
    numbers are fine)."""
    if not isinstance(data, dict):
        return None
    for field in _fields(model):
        value = data.get(field.key)
        if value is None:
            continue
        where = f"{path}.{field.key}" if path else field.key
        if field.is_number:
            if isinstance(value, list):
                for i, item in enumerate(value):
                    problem = _judge(field.key, item)
                    if problem is not None:
                        return f"{where}[{i}] {problem}"
            else:
                problem = _judge(field.key, value)
                if problem is not None:
                    return f"{where} {problem}"
        if field.nested is not None:
            if isinstance(value, list):
                for i, item in enumerate(value):
                    found = number_problem_in(field.nested, item, f"{where}[{i}]")
                    if found is not None:
                        return found
            else:
                found = number_problem_in(field.nested, value, where)
                if found is not None:
                    return found
    return None
