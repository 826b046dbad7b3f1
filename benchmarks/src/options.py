"""The error an options type raises about its own fields, and the checks they share.

A lower module (timing, verdicts, the feature cache, the probes) checks its options by its own field
names and knows nothing of the config keys they come from. Its :class:`OptionError` keeps the
fields it is about apart from the text, so the config layer (:mod:`encoder_fusion.benchmarks.config.plan`)
can name them by their keys instead: ``repeats=0 must be an int >= 1`` from the options type reads
``bench.latency.repeats=0 must be an int >= 1`` from the command line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# fewer bootstrap resamples give 2.5th/97.5th percentiles too noisy to report as an interval
MIN_RESAMPLES = 100


def shown(value: object) -> str:
    """A value as a config writes it: ``true``, ``null``, else its repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


class OptionError(ValueError):
    """A bad option value.

    Args:
        template: the message, naming each field it is about as ``{field}`` (rendered ``field=value``).
        values: field -> its value.
        keys: field -> the name to show it by (a config key); a field not listed shows its own name.
    """

    def __init__(self, template: str, values: Mapping[str, object], keys: Mapping[str, str] | None = None):
        self.template, self.values, self.keys = template, dict(values), dict(keys or {})
        named = {
            field: f"{self.keys.get(field, field)}={shown(value)}" for field, value in self.values.items()
        }
        super().__init__(template.format(**named))

    def keyed(self, keys: Mapping[str, str]) -> OptionError:
        """The same error naming its fields by ``keys`` (fields not in ``keys`` keep their names)."""
        return OptionError(self.template, self.values, {**self.keys, **keys})


def is_int(value: object) -> bool:
    """An int that is not a bool (YAML's ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(field: str, value: object, least: int) -> None:
    """Raise :class:`OptionError` unless ``value`` is an int >= ``least``."""
    if not is_int(value) or value < least:  # type: ignore[operator]
        raise OptionError(f"{{{field}}} must be an int >= {least}", {field: value})


def check_positive(field: str, value: object, kinds: tuple[type, ...] = (int, float)) -> None:
    """Raise :class:`OptionError` unless ``value`` is one of ``kinds`` (never a bool), finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < math.inf:  # type: ignore[operator]
        kind = " or ".join(k.__name__ for k in kinds)
        raise OptionError(f"{{{field}}} must be a positive, finite {kind}", {field: value})


def check_resamples(resamples: object) -> int:
    """``resamples`` when it is an int >= :data:`MIN_RESAMPLES`.

    Raises:
        OptionError: naming ``ci_resamples``, the value and what is accepted.
    """
    check_int("ci_resamples", resamples, MIN_RESAMPLES)
    return resamples  # type: ignore[return-value]  # checked to be an int just above
