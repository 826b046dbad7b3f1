"""The name -> strategy tables behind every strategy argument (``align``, ``layer_merge``,
``encoder_merge``, ``connector``): built from a name or a ``{"kind": name, **options}`` mapping, an
unknown name or option answered with the accepted ones."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from torch import nn

StrategyT = TypeVar("StrategyT", bound=nn.Module)


class Registry(Generic[StrategyT]):
    """A table of named strategy classes, built from a name or a ``{"kind": name, **options}`` mapping.

    Typed by the base class of its strategies (``Registry[Aligner]``), so that what it builds is
    known to be one.

    Args:
        what: the argument these strategies are chosen by (``"align"``, ``"layer_merge"``); it names
            the field in error messages.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, type[StrategyT]] = {}

    def register(self, name: str) -> Callable[[type[StrategyT]], type[StrategyT]]:
        """Class decorator adding a strategy under ``name``."""

        def add(cls: type[StrategyT]) -> type[StrategyT]:
            self._entries[name] = cls
            return cls

        return add

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def parse(self, value: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Split a strategy value into its name and options.

        Raises:
            ValueError: not a string or mapping, a mapping without ``kind``, an unknown name, or an
                option the strategy does not take.
        """
        if isinstance(value, str):
            kind, options = value, {}
        elif isinstance(value, Mapping) or hasattr(value, "items"):
            options = dict(value.items())
            if "kind" not in options:
                raise ValueError(
                    f"{self.what}={options!r} has no 'kind'; give one of: {', '.join(self._entries)}"
                )
            kind = options.pop("kind")
        else:
            raise ValueError(
                f"{self.what} must be a name or a mapping with 'kind', got {type(value).__name__} "
                f"{value!r}; accepted names: {', '.join(self._entries)}"
            )
        if kind not in self._entries:
            raise ValueError(f"{self.what}={kind!r} is unknown; accepted: {', '.join(self._entries)}")
        accepted = tuple(self.defaults(kind))
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"{self.what}={kind!r} got unknown option(s) {unknown}; accepted: "
                f"{', '.join(accepted) if accepted else 'none'}"
            )
        return kind, options

    def defaults(self, kind: str) -> dict[str, Any]:
        """The options strategy ``kind`` accepts (its keyword-only arguments) and their defaults."""
        signature = inspect.signature(self._entries[kind].__init__)
        return {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}

    def canonical(self, value: str | Mapping[str, Any]) -> dict[str, Any]:
        """``value`` as a plain mapping of ``kind`` and every option, defaults filled in: the form
        a saved config holds, so that equal strategies compare equal however they were written."""
        kind, options = self.parse(value)
        return {"kind": kind, **self.defaults(kind), **options}

    def build(self, value: str | Mapping[str, Any], *args: Any) -> StrategyT:
        """Instantiate the strategy named by ``value`` with the geometry ``args`` and its options."""
        kind, options = self.parse(value)
        return self._entries[kind](*args, **options)

    def kind(self, value: str | Mapping[str, Any]) -> str:
        """The strategy name of ``value`` (validated)."""
        return self.parse(value)[0]

    def strategy(self, value: str | Mapping[str, Any]) -> tuple[type[StrategyT], dict[str, Any]]:
        """The class ``value`` names and its options, defaults filled in (validated): what a check
        needs before anything is built."""
        options = self.canonical(value)
        return self._entries[options.pop("kind")], options
