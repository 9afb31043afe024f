"""The paper's hyperparameter search spaces (docs/model.md §5) as hyperopt spaces, and their trial configs.

The paper writes a log-uniform draw around a centre as ``c·loguniform(-s, s)``, meaning
``c·exp(U(-s, s))``: a value between ``c·e^-s`` and ``c·e^s`` whose logarithm is uniform. In
hyperopt that is ``hp.loguniform(label, log(c) - s, log(c) + s)`` (hyperopt's bounds are those of
the logarithm), which :func:`around` builds. ``quniform(a..b)`` is ``hp.quniform(label, a, b, 1)``:
``round(U(a, b))``, an integer value (as a float) from ``a`` to ``b``.

Round 2 (focused, 100 epochs, batch 256, 3 layers with residual stacking, BN∘elu on keys and
values), hyperopt expression and resulting range:

    learning_rate  0.006·loguniform(-0.4, 0.4)  hp.loguniform(log 0.006 ± 0.4)    0.00402 .. 0.00895
    decay_every    quniform(6..50)              hp.quniform(6, 50, 1)             6 .. 50
    l2             0.002·loguniform(-1.3, 1.3)  hp.loguniform(log 0.002 ± 1.3)    0.000545 .. 0.00734
    dropout_rate   uniform(0.05, 0.5)           hp.uniform(0.05, 0.5)
    features       68·loguniform(-0.3, 0.3)     hp.loguniform(log 68 ± 0.3)       50.4 .. 91.8 (requested)
    num_heads      quniform(20..40)             hp.quniform(20, 40, 1)            20 .. 40
    window_size    uniform(25, 100) as int      hp.uniform(25, 100)               25 .. 99
    mode           residual | layer             hp.choice
    use_positional_encoding  False | True       hp.choice

Round 1 (diffuse, 25 epochs, batch 256) differs in: learning_rate ``0.005·loguniform(-0.5, 0.5)``,
decay_every ``quniform(3..10)``, l2 ``0.005·loguniform(-1.3, 1.3)``, features
``64·loguniform(-0.6, 0.6)``, num_heads ``quniform(6..36)``, window_size ``uniform(10, 50)``, and
it also samples activation_on_keys_and_values (False | True), num_layers (2 | 3) and
residual_stacking (False | True).

The names are :class:`~experiments.config.TrainConfig`'s, which are the cell's
(:class:`~larnn_jax.LARNNCell`); points of sweeps made before the fields took those names are read
under the new ones (:data:`experiments.config.RENAMED_FIELDS`).

Every setting a space neither samples nor fixes keeps its :class:`~experiments.config.TrainConfig`
default (e.g. decay_factor 0.75, norm batch, kv_dropout_rate and attention_dropout_rate 0.1).

A sampled point becomes a trial's configuration by :func:`resolve_point`, which applies the integer
and divisibility rules explicitly (the model itself never rounds anything):

* ``num_heads``, ``decay_every``, ``num_layers``, ``batch_size``: rounded to the nearest integer;
* ``window_size``: truncated to an integer ("as int");
* ``features``: the sampled value is the *requested* size; the trial uses the nearest multiple of
  ``num_heads`` (at least ``num_heads``) and reports both, as ``features_requested`` and
  ``features``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from hyperopt import hp

from experiments.config import ConfigError, TrainConfig, older_scan, with_current_names

#: Integer fields a space may sample as floats; :func:`resolve_point` rounds them to the nearest.
ROUNDED_FIELDS = ("num_heads", "decay_every", "num_layers", "batch_size")
#: The fields of :class:`TrainConfig`, the only names a space may use.
FIELDS = frozenset(field.name for field in dataclasses.fields(TrainConfig))


def around(label: str, centre: float, spread: float) -> Any:
    """The paper's ``centre·loguniform(-spread, spread)``: ``centre·exp(U(-spread, spread))``.

    As a hyperopt expression: ``hp.loguniform(label, log(centre) - spread, log(centre) + spread)``.
    """
    return hp.loguniform(label, math.log(centre) - spread, math.log(centre) + spread)


def integer(label: str, low: int, high: int) -> Any:
    """The paper's ``quniform(low..high)``: ``hp.quniform(label, low, high, 1)``, an integer-valued
    float from ``low`` to ``high`` (the end points half as likely as the others)."""
    return hp.quniform(label, low, high, 1)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A hyperopt search space over :class:`TrainConfig` fields.

    Attributes:
        name: short name, used in experiment names.
        sampled: hyperopt expression per sampled field (``features`` is the requested size; see
            :func:`resolve_point`).
        fixed: the values every trial shares. ``epochs`` is the budget of each trial, never
            sampled.
        initial_points: points evaluated first, before any is sampled (values of every sampled
            field, categories given by value), e.g. a configuration known to be good.
    """

    name: str
    sampled: Mapping[str, Any]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    initial_points: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted((set(self.sampled) | set(self.fixed)) - FIELDS)
        if unknown:
            raise ConfigError(f"space {self.name}: not TrainConfig fields: {', '.join(unknown)}")
        if "epochs" in self.sampled:
            raise ConfigError(f"space {self.name}: epochs is the trial budget; fix it instead")
        both = sorted(set(self.sampled) & set(self.fixed))
        if both:
            raise ConfigError(f"space {self.name}: both sampled and fixed: {', '.join(both)}")
        for point in self.initial_points:
            if set(point) != set(self.sampled):
                raise ConfigError(
                    f"space {self.name}: an initial point must give exactly the sampled fields "
                    f"({', '.join(sorted(self.sampled))}); got {', '.join(sorted(point))}"
                )

    def settings(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The fixed values with ``overrides`` (e.g. a shorter ``epochs``) applied.

        Raises:
            ConfigError: an override names a sampled or unknown field.
        """
        overrides = dict(overrides or {})
        clash = sorted(set(overrides) & set(self.sampled))
        if clash:
            raise ConfigError(f"space {self.name} samples {', '.join(clash)}: cannot fix it")
        unknown = sorted(set(overrides) - FIELDS)
        if unknown:
            raise ConfigError(f"not TrainConfig fields: {', '.join(unknown)}")
        return {**self.fixed, **overrides}

    def hyperopt_space(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The space as hyperopt takes it: a dict of every field, sampled fields as expressions
        and fixed ones (with ``overrides``) as constants, so that a point is a whole trial."""
        return {**self.settings(overrides), **self.sampled}


#: Round 1 (diffuse), docs/model.md §5.
ROUND_1 = SearchSpace(
    name="round1",
    sampled={
        "learning_rate": around("learning_rate", 0.005, 0.5),
        "decay_every": integer("decay_every", 3, 10),
        "l2": around("l2", 0.005, 1.3),
        "dropout_rate": hp.uniform("dropout_rate", 0.05, 0.5),
        "features": around("features", 64, 0.6),
        "num_heads": integer("num_heads", 6, 36),
        "window_size": hp.uniform("window_size", 10, 50),
        "mode": hp.choice("mode", ["residual", "layer"]),
        "use_positional_encoding": hp.choice("use_positional_encoding", [False, True]),
        "activation_on_keys_and_values": hp.choice("activation_on_keys_and_values", [False, True]),
        "num_layers": hp.choice("num_layers", [2, 3]),
        "residual_stacking": hp.choice("residual_stacking", [False, True]),
    },
    fixed={"model": "larnn", "epochs": 25, "batch_size": 256},
)

#: Round 2 (focused), docs/model.md §5.
ROUND_2 = SearchSpace(
    name="round2",
    sampled={
        "learning_rate": around("learning_rate", 0.006, 0.4),
        "decay_every": integer("decay_every", 6, 50),
        "l2": around("l2", 0.002, 1.3),
        "dropout_rate": hp.uniform("dropout_rate", 0.05, 0.5),
        "features": around("features", 68, 0.3),
        "num_heads": integer("num_heads", 20, 40),
        "window_size": hp.uniform("window_size", 25, 100),
        "mode": hp.choice("mode", ["residual", "layer"]),
        "use_positional_encoding": hp.choice("use_positional_encoding", [False, True]),
    },
    fixed={
        "model": "larnn",
        "epochs": 100,
        "batch_size": 256,
        "num_layers": 3,
        "residual_stacking": True,
        "activation_on_keys_and_values": True,
    },
)

#: The spaces known by name.
SPACES: dict[str, SearchSpace] = {space.name: space for space in (ROUND_1, ROUND_2)}


def get_space(name: str) -> SearchSpace:
    """A space by name (``round1``, ``round2``) or as ``MODULE:ATTRIBUTE`` (an importable module
    holding a :class:`SearchSpace`, for spaces of one's own).

    Raises:
        ConfigError: unknown name, or the attribute is not a SearchSpace.
    """
    if name in SPACES:
        return SPACES[name]
    module_name, colon, attribute = name.partition(":")
    if not colon:
        raise ConfigError(f"unknown space {name!r}: use {', '.join(SPACES)} or MODULE:ATTRIBUTE")
    try:
        space = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot load space {name!r}: {err}") from err
    if not isinstance(space, SearchSpace):
        raise ConfigError(f"{name} is a {type(space).__name__}, not a SearchSpace")
    return space


class ResolvedPoint(NamedTuple):
    """A sampled point made into a trial: its configuration and the hidden size it asked for."""

    config: TrainConfig
    features_requested: float


def round_to_multiple(value: float, step: int) -> int:
    """The multiple of ``step`` nearest to ``value`` (halves round up), at least ``step``."""
    return max(step, step * math.floor(value / step + 0.5))


def resolve_point(point: Mapping[str, Any]) -> ResolvedPoint:
    """The trial configuration of a point of a space (a dict of TrainConfig field values).

    Applies the integer rules of the module docstring: the fields of :data:`ROUNDED_FIELDS` are
    rounded, ``window_size`` truncated, and ``features`` (default: TrainConfig's) rounded to a
    multiple of ``num_heads``. A field since renamed (a point of an older sweep) is read under its
    new name, and a point without ``scan`` gets the scan its sweep ran (:func:`older_scan`).

    Raises:
        ConfigError: unknown fields or invalid values.
    """
    values = with_current_names(point)
    values.setdefault("scan", older_scan(values))
    for name in ROUNDED_FIELDS:
        if name in values:
            values[name] = round(values[name])
    if "window_size" in values:
        values["window_size"] = int(values["window_size"])
    requested = float(values.get("features", TrainConfig.features))
    values["features"] = round_to_multiple(
        requested, values.get("num_heads", TrainConfig.num_heads)
    )
    return ResolvedPoint(TrainConfig.from_dict(values), requested)
