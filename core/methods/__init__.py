"""The registry of methods: one explicit dict, one line per method. The contract test in
tests/core/test_methods_contract.py runs every entry."""
from __future__ import annotations

from ..errors import UnknownMethodError
from .base import Budget, Encoder, KVMemory, Method, Options
from .combllama import CombLlama
from .full import Full
from .hcattention import HCAttention
from .kvcompose import KVCompose
from .truncate import Truncate

METHODS: dict[str, type[Method]] = {
    CombLlama.name: CombLlama,
    Full.name: Full,
    HCAttention.name: HCAttention,
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


def default_method(loaded, budget: Budget | None = None) -> Method:
    """The method `ingest`/`chat` use when none is named: CombLlama where an adapter trained for this exact
    model ships (matched by fingerprint), else `full`."""
    from .combllama import shipped_for

    if shipped_for(loaded.fingerprint) is not None:
        return get_method(CombLlama.name, None, budget)
    return get_method(Full.name, None, budget)


__all__ = ["METHODS", "default_method", "Budget", "Encoder", "KVMemory", "Method", "Options", "from_manifest",
           "get_method"]
