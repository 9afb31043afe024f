"""The configuration of a training run: :class:`TrainConfig`, its files and its older forms.

A run's settings are the fields of :class:`TrainConfig`; each field's metadata carries its
command-line help (and ``choices``, taken from the library's own constants), so the command line
of ``python -m experiments.train`` and the keys of ``--config`` files and ``config.json`` all come
from here. :meth:`TrainConfig.build_cell` is the one place where the settings become a model's cell.

Runs saved by earlier versions are read with :meth:`TrainConfig.from_saved`: a field they predate
takes the value they used (:data:`SETTINGS_OF_OLDER_RUNS`), a field since renamed its new name
(:data:`RENAMED_FIELDS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import numbers
import os
import pathlib
import typing
from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from experiments.augmentation import OPTIONS as AUGMENTATION_OPTIONS
from experiments.data import Dataset, DataSettingsError, check_dataset_spec, load_dataset
from larnn_jax.cell import (
    CELL_NORM_PLACEMENTS,
    MODES,
    BNLSTMCell,
    CellNormPlacement,
    LARNNCell,
    Mode,
)
from larnn_jax.normalization import NORM_KINDS, NormKind
from larnn_jax.scans import SCANS, Scan

#: The recurrent cells a run can train: the LARNN cell, the same cell without attention (the
#: BN-LSTM) and Flax's plain LSTM cell.
MODELS: tuple[str, ...] = ("larnn", "bnlstm", "lstm")
#: The learning-rate schedules (:func:`experiments.steps.learning_rate_schedule`).
SCHEDULES: tuple[str, ...] = ("step", "cosine")


#: Named ways to train (``python -m experiments.train --recipe NAME``): the TrainConfig values
#: each one sets, beneath a ``--config`` file and the flags. ``paper`` is the paper's training
#: to the letter (the TrainConfig defaults: 100 epochs, the learning rate multiplied by 0.75
#: every 26); ``recommended`` is the recipe chosen on validation subjects (docs/recipe.md), what
#: the command line trains by default.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    # Chosen on validation subjects (docs/recipe.md).
    "recommended": {
        "epochs": 25,
        "decay_every": 5,
        "decay_factor": 0.5,
        "ema_decay": 0.98,
        "label_smoothing": 0.1,
    },
}
#: The recipe of ``python -m experiments.train`` without ``--recipe``.
DEFAULT_RECIPE = "recommended"


def recipe_text(name: str) -> str:
    """``name``'s settings as flags (``--epochs 25 ...``), or what it stands for if none."""
    settings = RECIPES[name]
    if not settings:
        return "the defaults"
    return " ".join(f"--{field.replace('_', '-')} {value}" for field, value in settings.items())


class ConfigError(ValueError):
    """An invalid configuration, or one that contradicts the run being resumed."""


def _option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field carrying its command-line help (and ``choices``, ``metavar``, the
    flag's short forms ``aliases``) in its metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; defaults are the paper's best configuration (docs/model.md §5).

    Field names are the keys of ``--config`` files and of ``config.json``; the command-line flag
    of field ``some_name`` is ``--some-name`` (``--no-some-name`` for switches), some with a short
    form (``--window`` for ``--window-size``). The settings of the cell and of the classifier
    bear the names of their fields in the library (:class:`~larnn_jax.LARNNCell`,
    :class:`~larnn_jax.models.SequenceClassifier`): one name from the command line to the cell.
    Resuming a run requires the same values for all fields except :data:`RUN_FIELDS`.
    """

    model: str = _option(
        "larnn",
        "recurrent cell: larnn (LSTM attending over its recent cell states), bnlstm (the same "
        "cell without attention) or lstm (plain LSTM, no normalisation or dropout)",
        choices=MODELS,
    )
    mode: Mode = _option(
        "residual",
        "how attention enters the gates (larnn): residual (separate weights for input, hidden "
        "state and attention) or layer (one dense layer over their concatenation)",
        choices=MODES,
    )
    features: int = _option(
        81,
        "hidden size H: units of every layer (a multiple of --num-heads)",
        aliases=("--hidden",),
    )
    num_heads: int = _option(27, "attention heads (larnn)", aliases=("--heads",))
    window_size: int = _option(
        38,
        "attention window k: number of most recent cell states attended over, in time steps",
        aliases=("--window",),
    )
    num_layers: int = _option(3, "number of stacked recurrent layers", aliases=("--layers",))
    residual_stacking: bool = _option(
        True, "add each layer's output to its input sequence instead of replacing it"
    )
    use_positional_encoding: bool = _option(
        False,
        "concatenate a positional encoding to each window entry (larnn)",
        aliases=("--positional-encoding",),
    )
    activation_on_keys_and_values: bool = _option(
        True, "apply BN∘elu to attention keys and values (larnn)", aliases=("--kv-activation",)
    )
    norm: NormKind = _option(
        "batch",
        "normalisation inside the cells (larnn, bnlstm)",
        choices=NORM_KINDS,
    )
    cell_norm_placement: CellNormPlacement = _option(
        "output",
        "where the cell state's norm BN_c sits (larnn, bnlstm): output (c_t carried "
        "unnormalised, h_t = BN_h(o * elu(BN_c(c_t))); stable) or carried (the paper's "
        "c_t = BN_c(f * c_{t-1} + i * g), carried; its evaluation diverges on some sequences)",
        choices=CELL_NORM_PLACEMENTS,
    )
    dropout_rate: float = _option(
        0.0889, "dropout probability on each layer's output h_t", aliases=("--dropout",)
    )
    kv_dropout_rate: float = _option(
        0.1, "dropout probability on window entries (larnn)", aliases=("--kv-dropout",)
    )
    attention_dropout_rate: float = _option(
        0.1, "dropout probability on attention weights (larnn)", aliases=("--attention-dropout",)
    )
    norm_scale_init: float = _option(
        1.0,
        "initial scale (gamma) of the gate and cell-state norms (larnn, bnlstm; Cooijmans et al. "
        "use 0.1)",
    )
    learning_rate: float = _option(0.006026, "Adam's initial learning rate (per step)")
    l2: float = _option(
        0.00065,
        "L2 coefficient: l2 × weight is added to the gradient before Adam, like PyTorch Adam's "
        "weight_decay",
    )
    schedule: str = _option(
        "step",
        "learning-rate schedule: step (multiplied by --decay-factor every --decay-every epochs) "
        "or cosine (from --learning-rate down to 0 at the end of the last epoch, per step)",
        choices=SCHEDULES,
    )
    decay_every: int = _option(
        26, "multiply the learning rate by --decay-factor every this many epochs (step schedule)"
    )
    decay_factor: float = _option(0.75, "learning-rate decay factor (step schedule)")
    label_smoothing: float = _option(
        0.0,
        "training loss against labels smoothed to (1 - s) one-hot + s / classes (0: off; "
        "evaluation losses are never smoothed)",
    )
    ema_decay: float = _option(
        0.0,
        "keep an exponential moving average of the weights, updated after every step "
        "(average <- d * average + (1 - d) * weights), with its own norm statistics; it is the "
        "run's model (evaluated, selected, reported) and the raw weights' accuracies are "
        "recorded beside it (0: off)",
    )
    epochs: int = _option(100, "number of epochs (passes over the training rows)")
    batch_size: int = _option(
        256,
        "rows per training step, the last incomplete batch of each epoch being dropped; also "
        "the evaluation batch size",
    )
    scan: Scan = _option(
        "auto",
        "how the layers scan the sequence: auto (the library's choice for the cell, logged: the "
        "native step where it is available, else the fused scan), native (the fused scan with "
        "the native C++ step), fused (the fused window scan in XLA), plain (Flax's nn.RNN over "
        "the cell) or remat (training scans rematerialised in chunks of --remat-chunk-length "
        "steps: less memory for more time)",
        choices=SCANS,
    )
    remat_chunk_length: int | None = _option(
        None,
        "with --scan remat: the chunk length N, in time steps; N must divide the sequence length",
    )
    seed: int = _option(
        0,
        "random seed of initialisation, validation split, shuffling (per epoch) and dropout "
        "(per step)",
    )
    dataset: str = _option(
        "uci_har",
        "uci_har, or npz:PATH for a .npz file with X_train (N,T,C), y_train (N,), X_test, "
        "y_test and optionally X_val, y_val, subjects_train, class_names",
        metavar="SPEC",
    )
    data_dir: str | None = _option(
        None,
        "folder that holds (or receives) 'UCI HAR Dataset/' (default: $LARNN_DATA_DIR, else "
        "the user cache folder)",
        metavar="DIR",
    )
    validation_subjects: int = _option(
        4, "whole training subjects held out for validation when subject ids are known; 0: none"
    )
    validation_fraction: float = _option(
        0.2,
        "fraction of training rows held out for validation when subject ids are unknown (npz "
        "without X_val); 0: none",
    )
    standardize: bool = _option(
        True, "standardise every channel with the training rows' mean and standard deviation"
    )
    # Augmentation of the training rows (experiments/augmentation.py); 0 turns an option off.
    rotation_degrees: float = _option(
        0.0,
        "augmentation: turn each training sequence (every (x, y, z) channel triplet alike) about "
        "a random axis by a random angle within this many degrees",
    )
    rotation_about_x_degrees: float = _option(
        0.0,
        "augmentation: turn each training sequence about the sensors' x axis by a random angle "
        "within this many degrees (180: any turn)",
    )
    rotation_classes: str = _option(
        "",
        "augmentation: the rotations turn only the training sequences of these classes "
        "(comma-separated names, e.g. LAYING); empty: every class",
        metavar="NAMES",
    )
    scaling_sigma: float = _option(
        0.0, "augmentation: multiply each channel of a training sequence by 1 + sigma * N(0, 1)"
    )
    shift_steps: int = _option(
        0, "augmentation: delay or advance each training sequence by up to this many steps"
    )
    time_warp_sigma: float = _option(
        0.0,
        "augmentation: replay each training sequence at a smoothly varying speed, "
        "1 + sigma * N(0, 1) at 6 knots",
    )
    jitter_sigma: float = _option(
        0.0,
        "augmentation: add Gaussian noise of this standard deviation (in standardised units) to "
        "the training inputs",
    )
    out: str | None = _option(
        None,
        "run folder for config, metrics, checkpoints, report and figures (default: "
        "runs/<date>-<time>-<model>)",
        metavar="DIR",
    )
    progress: bool = _option(True, "show a progress bar per epoch (on a terminal only)")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = _checked_value(field.name, getattr(self, field.name), hints[field.name])
            object.__setattr__(self, field.name, value)  # e.g. numpy.int64 → int
            choices = field.metadata.get("choices")
            if choices is not None and getattr(self, field.name) not in choices:
                raise ConfigError(
                    f"{field.name} must be one of {', '.join(choices)}; got "
                    f"{getattr(self, field.name)!r}"
                )
        positive = (
            "features",
            "num_heads",
            "window_size",
            "num_layers",
            "decay_every",
            "epochs",
            "batch_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        unit = ("dropout_rate", "kv_dropout_rate", "attention_dropout_rate", "validation_fraction")
        for name in (*unit, "label_smoothing", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        if self.norm_scale_init <= 0:
            raise ConfigError(f"norm_scale_init must be > 0; got {self.norm_scale_init}")
        if self.learning_rate <= 0 or self.l2 < 0 or not 0 < self.decay_factor <= 1:
            raise ConfigError(
                "need learning_rate > 0, l2 >= 0 and 0 < decay_factor <= 1; got "
                f"{self.learning_rate}, {self.l2}, {self.decay_factor}"
            )
        if self.remat_chunk_length is not None and self.remat_chunk_length < 1:
            raise ConfigError(
                f"remat_chunk_length must be >= 1 (or null: off); got {self.remat_chunk_length}"
            )
        if self.scan == "remat" and self.remat_chunk_length is None:
            raise ConfigError(
                "scan remat needs remat_chunk_length (--remat-chunk-length N), the length of the "
                "rematerialised chunks"
            )
        if self.scan != "remat" and self.remat_chunk_length is not None:
            raise ConfigError(
                f"remat_chunk_length {self.remat_chunk_length} is used only by scan remat, not "
                f"{self.scan}: add --scan remat, or leave out --remat-chunk-length"
            )
        for name in AUGMENTATION_OPTIONS:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: off); got {getattr(self, name)}")
        if self.validation_subjects < 0:
            raise ConfigError(f"validation_subjects must be >= 0; got {self.validation_subjects}")
        try:
            check_dataset_spec(self.dataset)
        except DataSettingsError as err:
            raise ConfigError(f"dataset: {err}") from err
        if self.model == "larnn" and self.features % self.num_heads:
            raise ConfigError(
                f"features ({self.features}) must be a multiple of num_heads ({self.num_heads})"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a dict of field values (missing fields take their defaults).

        Raises:
            ConfigError: unknown keys, or invalid values.
        """
        _check_keys(values)
        return cls(**values)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> TrainConfig:
        """The config of a saved run (``config.json``, a checkpoint's metadata): as
        :meth:`from_dict`, but a field the run predates takes the value the run used
        (:data:`SETTINGS_OF_OLDER_RUNS`), not today's default, and a field since renamed is read
        under its new name (:data:`RENAMED_FIELDS`)."""
        return cls.from_dict(with_settings_of_older_runs(values))

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-serialisable."""
        return dataclasses.asdict(self)

    def build_cell(self) -> nn.RNNCellBase:
        """The recurrent cell of :attr:`model` with this configuration's settings (every layer
        of the classifier copies it): ``nn.LSTMCell``, :class:`~larnn_jax.BNLSTMCell` or
        :class:`~larnn_jax.LARNNCell`."""
        if self.model == "lstm":
            return nn.LSTMCell(self.features)
        if self.model == "bnlstm":
            return BNLSTMCell(
                self.features,
                norm=self.norm,
                cell_norm_placement=self.cell_norm_placement,
                dropout_rate=self.dropout_rate,
                norm_scale_init=self.norm_scale_init,
            )
        return LARNNCell(
            self.features,
            num_heads=self.num_heads,
            window_size=self.window_size,
            mode=self.mode,
            use_positional_encoding=self.use_positional_encoding,
            activation_on_keys_and_values=self.activation_on_keys_and_values,
            norm=self.norm,
            cell_norm_placement=self.cell_norm_placement,
            dropout_rate=self.dropout_rate,
            kv_dropout_rate=self.kv_dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            norm_scale_init=self.norm_scale_init,
        )


#: Fields that may differ when a run is resumed: they change where things go, how long the run is,
#: how fast it runs or how much memory it takes, not what any completed epoch computes. (With
#: dropout, another scan or chunk length draws other dropout masks in later epochs, from the same
#: distribution.)
RUN_FIELDS = frozenset({"epochs", "scan", "remat_chunk_length", "data_dir", "out", "progress"})


#: Fields added after runs had been saved without them, with the value those runs used. (And
#: ``scan``, whose value followed from ``remat_chunk_length``: :func:`older_scan`.)
SETTINGS_OF_OLDER_RUNS: dict[str, Any] = {"cell_norm_placement": "carried"}

#: Fields renamed after runs had been saved with them: old name → today's name. The cell's
#: settings took the names of the cell's own fields (:class:`~larnn_jax.LARNNCell`,
#: :class:`~larnn_jax.models.SequenceClassifier`), so that one name runs from the command line
#: to the cell.
RENAMED_FIELDS: dict[str, str] = {
    "checkpoint_every": "remat_chunk_length",
    "hidden": "features",
    "heads": "num_heads",
    "window": "window_size",
    "layers": "num_layers",
    "positional_encoding": "use_positional_encoding",
    "kv_activation": "activation_on_keys_and_values",
    "dropout": "dropout_rate",
    "kv_dropout": "kv_dropout_rate",
    "attention_dropout": "attention_dropout_rate",
}


def with_current_names(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every field that has since been renamed under its new name."""
    return {RENAMED_FIELDS.get(name, name): value for name, value in values.items()}


def older_scan(values: Mapping[str, Any]) -> str:
    """The scan of a configuration saved before ``scan`` was a field (a run, a sweep's point),
    when setting ``remat_chunk_length`` turned rematerialisation on: ``'remat'`` where it is set,
    else ``'auto'``."""
    return "auto" if values.get("remat_chunk_length") is None else "remat"


def with_settings_of_older_runs(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved configuration with today's field names, and the fields it predates filled in as
    that run used them."""
    values = with_current_names(saved)
    return {**SETTINGS_OF_OLDER_RUNS, "scan": older_scan(values), **values}


def _check_keys(values: Mapping[str, Any]) -> None:
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    renamed = [
        f"{name} was renamed: use {RENAMED_FIELDS[name]} instead"
        for name in unknown
        if name in RENAMED_FIELDS
    ]
    if renamed:
        raise ConfigError("config key " + "; ".join(renamed))
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )


def _field_types(annotation: Any) -> tuple[Any, ...]:
    """The types a field annotation admits: ``str | None`` → ``(str, NoneType)``, a ``Literal``
    of strings (``Mode``; its values are the field's ``choices``) → ``(str,)``."""
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(dict.fromkeys(type(value) for value in typing.get_args(annotation)))
    return tuple(typing.get_args(annotation)) or (annotation,)


def _checked_value(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the plain Python type of the field, or ConfigError if it is not one.

    Any integer (numpy's too, as sweeps produce) is accepted for int fields, any real number for
    float fields; a bool is accepted only where a bool is expected.
    """
    allowed = _field_types(annotation)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif int in allowed and isinstance(value, numbers.Integral):
        return int(value)
    elif float in allowed and isinstance(value, numbers.Real):
        return float(value)
    elif str in allowed and isinstance(value, str):
        return value
    expected = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
    raise ConfigError(f"{name} must be {expected}; got {value!r}")


def load_config_file(path: os.PathLike | str) -> dict[str, Any]:
    """Reads a JSON object of TrainConfig fields and checks its keys (not yet its values).

    Raises:
        ConfigError: the file is unreadable, not a JSON object, or has unknown keys.
    """
    try:
        values = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of TrainConfig fields")
    try:
        _check_keys(values)
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from err
    return values


def load_config_dataset(config: TrainConfig) -> Dataset:
    """The dataset ``config`` names, split and standardised as its settings say.

    Raises:
        ConfigError: settings that do not fit the data (a validation split that would leave the
            training or the validation part empty).
        experiments.data.DataError: the data is missing or malformed.
    """
    try:
        return load_dataset(
            config.dataset,
            config.data_dir,
            validation_subjects=config.validation_subjects,
            validation_fraction=config.validation_fraction,
            standardize=config.standardize,
            seed=config.seed,
        )
    except DataSettingsError as err:
        raise ConfigError(str(err)) from err


def check_remat_chunk_length(remat_chunk_length: int | None, dataset: Dataset) -> None:
    """Raises :class:`ConfigError` unless ``remat_chunk_length`` is off or divides the dataset's
    sequence length ``T`` (the rematerialised scan runs in chunks of that many steps)."""
    steps = dataset.train.x.shape[1]
    if remat_chunk_length is not None and steps % remat_chunk_length:
        raise ConfigError(
            f"remat_chunk_length {remat_chunk_length} does not divide the sequence length "
            f"T = {steps} of {dataset.name}"
        )


def absolute_path(path: str | os.PathLike[str]) -> str:
    """``path`` absolute, ``~`` expanded: what config.json and sweep trials store, so that a run
    resumed or evaluated, or a trial run, in another working directory finds it."""
    return str(pathlib.Path(path).expanduser().absolute())


def absolute_dataset_spec(spec: str) -> str:
    """``npz:PATH`` with PATH made :func:`absolute_path`; other specs as they are."""
    if spec.startswith("npz:"):
        return "npz:" + absolute_path(spec.removeprefix("npz:"))
    return spec


def config_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Every field (outside :data:`RUN_FIELDS`, ``epochs`` included with a cosine schedule) in
    which ``config`` differs from the saved configuration of a run (read as
    :meth:`TrainConfig.from_saved` reads it), as ``"name: <saved> in the run, <value> now"``."""
    saved = with_settings_of_older_runs(saved)
    current = config.to_dict()
    # A cosine schedule spans the run's epochs: changing them changes every epoch's rate.
    free = RUN_FIELDS - {"epochs"} if config.schedule == "cosine" else RUN_FIELDS
    return [
        f"{name}: {saved.get(name, '<absent>')!r} in the run, {current.get(name, '<absent>')!r} now"
        for name in sorted(set(saved) | set(current))
        if name not in free and saved.get(name) != current.get(name)
    ]


def check_same_config(saved: dict[str, Any], config: TrainConfig, where: pathlib.Path) -> None:
    """Raises ConfigError naming every field in which ``config`` differs from the saved
    configuration of the run in ``where`` (:func:`config_differences`)."""
    differences = config_differences(saved, config)
    if differences:
        raise ConfigError(
            f"cannot resume {where}: its configuration differs in "
            + "; ".join(differences)
            + " (start a new run with another --out, or use the run's values)"
        )


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def add_field_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per TrainConfig field to ``parser``: ``--some-name`` for field
    ``some_name`` (``--some-name/--no-some-name`` for switches), with the field's help, default
    and choices, and the short forms its metadata lists under ``aliases`` (``--window`` for
    ``--window-size``).

    Every flag defaults to "not given" (absent from the parsed namespace), so that flags can
    override the values of a ``--config`` file, which override the :data:`DEFAULT_RECIPE`'s
    settings, which override the TrainConfig defaults; the help gives both where they differ.
    """
    hints = typing.get_type_hints(TrainConfig)

    def shown(value: Any) -> Any:
        if value == "":
            return "empty"
        return "on" if value is True else "off" if value is False else value

    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        note = f" (default: {shown(default)})"
        if field.name in RECIPES[DEFAULT_RECIPE]:
            recipe_value = RECIPES[DEFAULT_RECIPE][field.name]
            note = f" (default: {shown(recipe_value)}; --recipe paper: {shown(default)})"
        options: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            # A None default is explained by the help text itself.
            "help": field.metadata["help"] + ("" if default is None else note),
        }
        if hints[field.name] is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            kind = next(t for t in (int, float, str) if t in _field_types(hints[field.name]))
            options["type"] = kind
            options["choices"] = field.metadata.get("choices")
            if options["choices"] is None:
                options["metavar"] = field.metadata.get("metavar", _METAVARS[kind])
        parser.add_argument(flag, *field.metadata.get("aliases", ()), **options)
