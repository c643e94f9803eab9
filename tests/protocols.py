"""Does an object play a role? Checks an instance against a Protocol of `consumer.kafka.roles`.

Every attribute the Protocol declares must be there, and every method must accept each call
the Protocol allows: its required parameters by position and each optional one by name, and
nothing more required. A type checker would say the same; this runs with the tests.
"""

from __future__ import annotations

import inspect
from typing import Any


def protocol_members(protocol: type) -> tuple[set[str], dict[str, inspect.Signature]]:
    """The attributes and the methods (with their signatures, `self` left out) a Protocol declares."""
    attributes: set[str] = set()
    methods: dict[str, inspect.Signature] = {}
    for cls in protocol.__mro__:
        if cls is object or not getattr(cls, "_is_protocol", False):
            continue
        attributes.update(getattr(cls, "__annotations__", {}))
        for name, value in vars(cls).items():
            if callable(value) and not name.startswith("_"):
                signature = inspect.signature(value)
                methods[name] = signature.replace(parameters=list(signature.parameters.values())[1:])
    return attributes - set(methods), methods


def role_problems(instance: Any, protocol: type) -> list[str]:
    """What keeps `instance` from playing `protocol`; empty when it does."""
    problems = []
    attributes, methods = protocol_members(protocol)
    for name in sorted(attributes):
        if not hasattr(instance, name):
            problems.append(f"no attribute {name}")
    for name, wanted in sorted(methods.items()):
        method = getattr(instance, name, None)
        if not callable(method):
            problems.append(f"no method {name}")
            continue
        actual = inspect.signature(method)
        required = [p for p in wanted.parameters.values() if p.default is inspect.Parameter.empty]
        optional = [p for p in wanted.parameters.values() if p.default is not inspect.Parameter.empty]
        try:
            actual.bind(*(object() for _ in required))
        except TypeError as exc:
            problems.append(f"{name}{actual} cannot be called as {name}{wanted}: {exc}")
            continue
        for parameter in optional:
            try:
                actual.bind(*(object() for _ in required), **{parameter.name: object()})
            except TypeError:
                problems.append(f"{name}{actual} does not take {parameter.name}, which {name}{wanted} allows")
    return problems
