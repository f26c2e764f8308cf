"""The registry of methods: one explicit dict, one line per method. The contract test in
tests/core/test_methods_contract.py runs every entry."""
from __future__ import annotations

from ..errors import UnknownMethodError
from .base import Budget, Encoder, KVMemory, Method, Options
from .full import Full
from .kvcompose import KVCompose
from .truncate import Truncate

METHODS: dict[str, type[Method]] = {
    Full.name: Full,
    KVCompose.name: KVCompose,
    Truncate.name: Truncate,
}


def get_method(name: str, params: dict | None = None, budget: Budget | None = None) -> Method:
    """Instantiate a registered method with validated options."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r} (registered: {', '.join(METHODS)})") from None
    options = cls.Options.from_json(params or {})
    return cls(options, budget)


def from_manifest(manifest: dict) -> Method:
    """The method that wrote a memory, with the options it was written with."""
    params = dict(manifest["method"].get("params") or {})
    budget_json = params.pop("budget", None)
    budget = Budget(**budget_json) if budget_json else None
    return get_method(manifest["method"]["name"], params, budget)


__all__ = ["METHODS", "Budget", "Encoder", "KVMemory", "Method", "Options", "from_manifest", "get_method"]
