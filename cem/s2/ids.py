"""S2 identifiers: the schema pattern, and the per-session translation to UUIDs.

The S2 JSON schema allows any id matching ``[a-zA-Z0-9\\-_:]{2,64}`` (the official documentation
examples use ids such as ``"sd-1"``), but the s2-python models we validate with insist on UUIDs.
So before validation every id that is not already a canonical UUID string is replaced by a
deterministic ``uuid5`` (namespace chosen per session) and remembered; when the CEM sends a
message the UUIDs are translated back, so a resource manager always sees its own ids.

Which fields are ids is read from the schema itself (the generated models in
``s2python.generated.gen_s2``), not guessed from field names: every field typed ``ID``,
``Optional[ID]`` or ``List[ID]``, at any depth (``message_id``, ``id``, DDBC's ``Id``,
``actuator_id``, FRBC.Instruction's ``operation_mode``, a transition's ``from``/``to``,
``start_timers``, ``blocking_timers``, ``subject_message_id``, ``object_id``, ...).
"""

from __future__ import annotations

import hashlib
import re
import types
import typing
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeGuard

from pydantic import BaseModel, RootModel
from s2python.generated import gen_s2

ID_PATTERN = re.compile(r"[a-zA-Z0-9\-_:]{2,64}")
NIL_UUID = "00000000-0000-0000-0000-000000000000"
"""Subject of a ReceptionStatus for a message without a usable message_id (as s2-python does)."""


def is_valid_id(value: object) -> TypeGuard[str]:
    """True if ``value`` is a string that matches the whole S2 ID pattern."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def id_key(value: object) -> str:
    """An id as a plain string, whatever s2-python made of it (UUID, generated ``ID``, str)."""
    if isinstance(value, RootModel):
        return str(value.root)
    return str(value)


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_canonical_uuid(value: str) -> bool:
    """True if ``value`` is a UUID written exactly as Python writes it (lower case, hyphens).

    The same answer as ``str(uuid.UUID(value)) == value``, without building a UUID (this runs
    for every id of every message).
    """
    return _CANONICAL_UUID.fullmatch(value) is not None


@dataclass(frozen=True)
class _FieldShape:
    key: str                               # the JSON key (alias, e.g. "from")
    is_id: bool                            # ID, Optional[ID] or List[ID]
    nested: type[BaseModel] | None         # a nested schema object (or a list of them)


def concrete_types(annotation: Any) -> list[Any]:
    """The concrete types inside Optional[...] / List[...] / Union[...]."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple):
        found: list[Any] = []
        for arg in typing.get_args(annotation):
            found.extend(concrete_types(arg))
        return found
    return [annotation]


@cache
def _shape(model: type[BaseModel]) -> tuple[_FieldShape, ...]:
    shapes = []
    for name, info in model.model_fields.items():
        inner = concrete_types(info.annotation)
        is_id = any(t is gen_s2.ID for t in inner)
        nested = next(
            (t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)
             and not issubclass(t, RootModel)),
            None,
        )
        if is_id or nested is not None:
            shapes.append(_FieldShape(info.alias or name, is_id, nested))
    return tuple(shapes)


@cache
def _id_fields(model: type[BaseModel]) -> tuple[_FieldShape, ...]:
    """The fields of ``model`` that hold ids, themselves or deeper down; the rest is skipped.

    A PowerMeasurement's ``values``, for instance, hold no ids: walking them on every message
    would only cost time.
    """
    return tuple(f for f in _shape(model)
                 if f.is_id or (f.nested is not None and _id_fields(f.nested)))


def generated_model(message_type: str) -> type[BaseModel] | None:
    """The schema-faithful generated model for a message type, or None if unknown."""
    found = _GENERATED.get(message_type)
    if found is None:
        found = _find_generated_model(message_type)
        if found is not None:  # unknown names are not kept: an RM chooses them
            _GENERATED[message_type] = found
    return found


_GENERATED: dict[str, type[BaseModel]] = {}


def _find_generated_model(message_type: str) -> type[BaseModel] | None:
    candidate = getattr(gen_s2, message_type.replace(".", ""), None)
    if isinstance(candidate, type) and issubclass(candidate, BaseModel):
        fields = candidate.model_fields
        if "message_type" in fields and fields["message_type"].default == message_type:
            return candidate
    return None


def map_ids(model: type[BaseModel], data: Any, change: Callable[[str], str]) -> Any:
    """A copy of ``data`` (JSON of ``model``) with ``change`` applied to every id string."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for field in _id_fields(model):
        if field.key not in out:
            continue
        value = out[field.key]
        if field.is_id:
            if isinstance(value, str):
                out[field.key] = change(value)
            elif isinstance(value, list):
                out[field.key] = [change(v) if isinstance(v, str) else v for v in value]
        elif field.nested is not None:
            if isinstance(value, list):
                out[field.key] = [map_ids(field.nested, v, change) for v in value]
            else:
                out[field.key] = map_ids(field.nested, value, change)
    return out


def iter_ids(model: type[BaseModel], data: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (json path, value) at an id position of ``data``."""
    if not isinstance(data, dict):
        return
    for field in _id_fields(model):
        if field.key not in data:
            continue
        value = data[field.key]
        where = f"{path}.{field.key}" if path else field.key
        if field.is_id:
            if isinstance(value, list):
                for i, v in enumerate(value):
                    yield f"{where}[{i}]", v
            else:
                yield where, value
        elif field.nested is not None:
            if isinstance(value, list):
                for i, v in enumerate(value):
                    yield from iter_ids(field.nested, v, f"{where}[{i}]")
            else:
                yield from iter_ids(field.nested, value, where)


_UUID5_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))   # the version and variant bits
_UUID5_SET = (0x5000 << 64) | (0x8000 << 48)        # version 5, RFC 4122 variant


class IdTranslator:
    """Maps a resource manager's own ids to UUIDs and back, for one session.

    The reverse map only grows with ids of messages the CEM accepted (`begin` / `commit` /
    `rollback` around handling one message), and message ids are remembered only when asked,
    so a long session with millions of measurements does not grow it.
    """

    def __init__(self, namespace: uuid.UUID | None = None) -> None:
        self.namespace = namespace or uuid.uuid4()
        self._to_external: dict[str, str] = {}
        self._staged: dict[str, str] | None = None
        self._hash = hashlib.sha1(self.namespace.bytes, usedforsecurity=False)  # for uuid5

    def to_internal(self, external: str, remember: bool = True) -> str:
        """The UUID string the CEM uses for an id the RM sent."""
        if is_canonical_uuid(external):
            return external
        internal = self._uuid5(external)
        if remember:
            target = self._staged if self._staged is not None else self._to_external
            target[internal] = external
        return internal

    def _uuid5(self, name: str) -> str:
        """``str(uuid.uuid5(self.namespace, name))``, the same text in a third of the time
        (no UUID object; the namespace is hashed once): an RM that numbers its messages
        rather than giving them UUIDs has one translated per message."""
        digest = self._hash.copy()
        digest.update(name.encode())
        value = int.from_bytes(digest.digest()[:16], "big")
        text = "%032x" % (value & _UUID5_CLEAR | _UUID5_SET)
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

    def to_external(self, internal: str) -> str:
        """The id the RM knows for a UUID string the CEM uses (unchanged if never translated)."""
        if self._staged is not None and internal in self._staged:
            return self._staged[internal]
        return self._to_external.get(internal, internal)

    def external_of(self, value: object) -> str:
        """``to_external`` for a UUID, a generated ``ID`` or a string."""
        return self.to_external(id_key(value))

    def begin(self) -> None:
        """Collect new ids aside until the message that carries them is accepted."""
        self._staged = {}

    def commit(self) -> None:
        if self._staged:
            self._to_external.update(self._staged)
        self._staged = None

    def rollback(self) -> None:
        self._staged = None

    @property
    def translates(self) -> bool:
        """Whether any id is translated (else `to_external` gives every id back as it is)."""
        return bool(self._to_external) or bool(self._staged)

    @property
    def translated(self) -> dict[str, str]:
        """internal UUID -> RM's id, for every remembered id that was not a UUID."""
        return dict(self._to_external)
