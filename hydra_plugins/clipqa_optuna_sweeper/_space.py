"""The search space: Hydra's override grammar (``hydra.sweeper.params`` and the command line) -> Optuna distributions,
and the sampled values back to override text a job reads as the same values.

``choice(a, b)`` / ``a,b``: categorical; ``range(start, stop, step)``: Hydra's values (stop excluded, negative steps
too); ``interval(lo, hi)``: float, int when cast (``int(interval(1, 5))``) or tagged ``int``, log-scaled when tagged
``log``. A plain value on the command line fixes the key (it leaves the space). :func:`grid` is the same space as the
finite set of points ``hydra/sweeper/sampler=grid`` walks.
"""

import re
from copy import copy
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, ListConfig

from .errors import SweeperError

_PRIMITIVE = (str, int, float, bool, type(None))


@dataclass
class SearchSpace:
    """What :func:`search_space` reads: the distributions, the overrides every job gets, and the params whose
    categorical choices are override text (lists, dicts), passed to the job verbatim."""

    distributions: dict[str, Any] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    verbatim: set[str] = field(default_factory=set)

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """The overrides of one trial: the fixed ones, then its sampled values as override text."""
        return [*self.fixed, *(f"{k}={v if k in self.verbatim else encode(v)}" for k, v in params.items())]


def search_space(params: dict[str, str], arguments: list[str]) -> SearchSpace:
    """hydra.sweeper.params, then the command line (a sweep there joins the space or replaces that key's entry; a
    plain value fixes the key: it leaves the space)."""
    parser = OverridesParser.create()
    space = SearchSpace()
    names: dict[str, str] = {}  # key_or_group -> the param's name in the space
    fixed: dict[str, str] = {}  # key_or_group -> the override line every job gets
    entries = [(f"{k}={v}", f"hydra.sweeper.params.{k}") for k, v in params.items()]
    entries += [(a, "the command line") for a in arguments]
    for line, where in entries:
        try:
            (override,) = parser.parse_overrides([line])
        except OverrideParseException as e:
            raise SweeperError(f"{where}: cannot read {line!r}: {str(e).splitlines()[0]}") from None
        key = override.key_or_group
        if key in names:
            space.distributions.pop(names.pop(key))
        fixed.pop(key, None)
        if not override.is_sweep_override():
            fixed[key] = override.input_line
            continue
        name = names[key] = override.get_key_element()
        space.distributions[name] = distribution(override)
        value = override.value()
        if isinstance(value, ChoiceSweep) and not all(isinstance(c, _PRIMITIVE) for c in value.list):
            space.verbatim.add(name)
    space.fixed = list(fixed.values())
    return space


def distribution(override: Override):
    """The Optuna distribution of one search-space entry, holding exactly the values Hydra's grammar means.

    ``choice(a, b)`` / ``a,b``: categorical (lists and dicts among the choices travel as their override text);
    ``range(start, stop, step)``: Hydra's values (stop excluded, negative steps too), as an int distribution with
    that step, or categorical when a value is a float; ``interval(lo, hi)``: float, int when cast
    (``int(interval(1, 5))``) or tagged ``int``, log-scaled when tagged ``log``. Casts (``int(...)``,
    ``float(...)``, ``str(...)``) act on the values, as in Hydra.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        choices = list(value.list)
        if all(isinstance(c, _PRIMITIVE) for c in choices):
            return CategoricalDistribution(choices)
        return CategoricalDistribution([encode(c) for c in choices])
    if isinstance(value, RangeSweep):
        ordered = copy(value)
        ordered.shuffle = False  # the set of values is what counts; Optuna picks the order
        values = list(ordered.range())
        if not values:
            raise SweeperError(
                f"hydra.sweeper.params.{key}: {_expression(override)} holds no values (Hydra's range "
                "excludes stop; a descending range needs a negative step: range(5, 0, -1))."
            )
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            step = abs(int(value.step)) if len(values) > 1 else 1
            return IntDistribution(min(values), max(values), step=step)
        return CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        tags = set(value.tags or ())
        log_scale = "log" in tags
        if "int" in tags or (isinstance(value.start, int) and isinstance(value.end, int)):
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SweeperError(
        f"hydra.sweeper.params.{key}: {_expression(override)} is not a search space; use choice(...), "
        "range(...), interval(...) or tag(log, interval(...))."
    )


def grid(distributions: dict[str, Any]) -> dict[str, list]:
    """The search space as GridSampler's ``search_space``: every value of every parameter."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    points = {}
    for name, d in distributions.items():
        if isinstance(d, CategoricalDistribution):
            points[name] = list(d.choices)
        elif isinstance(d, IntDistribution) and not d.log:
            points[name] = list(range(d.low, d.high + 1, d.step))
        else:
            raise SweeperError(
                f"hydra/sweeper/sampler=grid needs a finite set of values, but {name} is {d}: write it as "
                "choice(...) or range(...) (hydra.sweeper.params or the command line)."
            )
    return points


def _expression(override: Override) -> str:
    return (override.input_line or "").split("=", 1)[-1]


def encode(value: Any) -> str:
    """A value as override text that Hydra reads back as the same value (strings quoted where needed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple | ListConfig):
        return "[" + ",".join(encode(v) for v in value) + "]"
    if isinstance(value, dict | DictConfig):
        return "{" + ",".join(f"{encode(k)}:{encode(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _reads_back(text, text):
        return text
    quoted = "'" + re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", re.sub(r"(\\+)$", r"\1\1", text)) + "'"
    if not _reads_back(quoted, text):
        raise SweeperError(f"Cannot pass the value {text!r} to a job as a Hydra override; use a simpler value.")
    return quoted


def _reads_back(text: str, value: Any) -> bool:
    try:
        parsed = OverridesParser.create().parse_override(f"k={text}")
    except HydraException:  # not readable as it stands: quote it
        return False
    return not parsed.is_sweep_override() and parsed.value() == value and type(parsed.value()) is type(value)
