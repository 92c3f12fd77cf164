"""Continual-learning methods behind one interface (see :mod:`gorp.methods.base`)."""

from __future__ import annotations

from gorp.methods.base import ContinualMethod
from gorp.methods.full import Full
from gorp.methods.galore import Galore
from gorp.methods.gorp import Gorp
from gorp.methods.lora import Lora
from gorp.methods.olora import Olora
from gorp.methods.osft import Osft
from gorp.methods.slice import Slice

METHODS: dict[str, type[ContinualMethod]] = {m.name: m for m in (Gorp, Full, Lora, Olora, Galore, Osft, Slice)}


def build_method(name: str, **hparams) -> ContinualMethod:
    """A method by name, its hyperparameters validated."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](**hparams)


__all__ = ["METHODS", "ContinualMethod", "build_method"]
