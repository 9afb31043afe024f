"""The models a benchmark measures, built as the training builds them (:class:`Workload`), and
their training step and evaluation-mode forward pass, compiled for one batch
(:class:`TrainingBench`, :class:`InferenceBench`).
"""

from __future__ import annotations

import dataclasses
import resource
from typing import TypedDict, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.harness.memory_use import memory_analysis
from benchmarks.harness.timing import timed_compile
from experiments.config import TrainConfig
from experiments.steps import build_model, init_state, make_optimizer, make_train_step
from larnn_jax.models import SequenceClassifier
from larnn_jax.normalization import NormKind
from larnn_jax.reference import ReferenceLARNNCell
from larnn_jax.scans import Scan
from larnn_jax.typing import PyTree

_PAPER_CONFIG = TrainConfig()


class Sizes(TypedDict):
    """The sizes of a :class:`Workload` (:data:`PAPER`'s)."""

    batch: int
    steps: int
    inputs: int
    classes: int
    features: int
    num_heads: int
    window_size: int
    num_layers: int
    dropout_rate: float


# The paper's UCI HAR configuration (docs/model.md §5): 9 inertial channels x 128 steps, 6 classes, and
# the training's defaults (its best hyperparameters).
PAPER: Sizes = {
    "batch": _PAPER_CONFIG.batch_size,
    "steps": 128,
    "inputs": 9,
    "classes": 6,
    "features": _PAPER_CONFIG.features,
    "num_heads": _PAPER_CONFIG.num_heads,
    "window_size": _PAPER_CONFIG.window_size,
    "num_layers": _PAPER_CONFIG.num_layers,
    "dropout_rate": _PAPER_CONFIG.dropout_rate,
}


# Models a benchmark can build: the training's three (``TrainConfig.model``), and LARNN with the
# XLA fused scan (``scan='fused'``, what ``'auto'`` runs without the native step), with the plain
# scan (``nn.RNN`` over the cell, the implementation before the fused scan), with rematerialised
# training scans (``scan='remat'``) and with the reference cell (``larnn_naive``).
BLOCKS = ("larnn", "larnn_fused", "larnn_remat", "larnn_plain", "larnn_naive", "bnlstm", "lstm")
#: The scan of each LARNN block other than the training's default (``'auto'``).
_SCANS: dict[str, Scan] = {"larnn_fused": "fused", "larnn_remat": "remat", "larnn_plain": "plain"}


def default_remat_chunk_length(steps: int) -> int:
    """The divisor of ``steps`` nearest ``sqrt(steps)`` (chunk length for rematerialisation)."""
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return min(divisors, key=lambda d: abs(d - steps**0.5))


@dataclasses.dataclass(frozen=True)
class Workload:
    """A classifier (docs/model.md §3) and the batch it trains on; the unit every benchmark measures.

    The model is the training's (:func:`experiments.steps.build_model`) for the
    :class:`~experiments.config.TrainConfig` of :meth:`config`: the paper's configuration (the
    training's defaults) but for the sizes given here. ``block`` is one of :data:`BLOCKS`:

    * ``'larnn'``, ``'bnlstm'``, ``'lstm'``: the training's models, with the training's default
      ``scan='auto'`` (for LARNN the native step where it is available, else the fused scan);
    * ``'larnn_fused'``: LARNN with ``scan='fused'`` (the XLA fused scan);
    * ``'larnn_plain'``: LARNN with ``scan='plain'`` (``nn.RNN`` over the cell);
    * ``'larnn_remat'``: LARNN with rematerialised training scans in chunks of
      ``remat_chunk_length`` steps (default: the divisor of ``steps`` nearest its square root),
      as ``TrainConfig(scan="remat", remat_chunk_length=N)`` trains;
    * ``'larnn_naive'``: LARNN (same variables) with
      :class:`~larnn_jax.reference.ReferenceLARNNCell`, the definition without its savings.
    """

    block: str
    batch: int = PAPER["batch"]
    steps: int = PAPER["steps"]
    inputs: int = PAPER["inputs"]
    classes: int = PAPER["classes"]
    features: int = PAPER["features"]
    num_heads: int = PAPER["num_heads"]
    window_size: int = PAPER["window_size"]
    num_layers: int = PAPER["num_layers"]
    dropout_rate: float = PAPER["dropout_rate"]
    norm: NormKind = _PAPER_CONFIG.norm
    remat_chunk_length: int | None = None

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")

    @property
    def chunk(self) -> int:
        """The chunk length of ``'larnn_remat'``."""
        return self.remat_chunk_length or default_remat_chunk_length(self.steps)

    def config(self) -> TrainConfig:
        """The training configuration of this workload's model and batch."""
        return dataclasses.replace(
            _PAPER_CONFIG,
            model=self.block.partition("_")[0],
            features=self.features,
            num_heads=self.num_heads,
            window_size=self.window_size,
            num_layers=self.num_layers,
            dropout_rate=self.dropout_rate,
            norm=self.norm,
            batch_size=self.batch,
            scan=_SCANS.get(self.block, "auto"),
            remat_chunk_length=self.chunk if self.block == "larnn_remat" else None,
        )

    def model(self) -> SequenceClassifier:
        """The classifier, as the training builds it (with the scan or cell ``block`` names)."""
        model = build_model(self.config(), self.classes)
        if self.block == "larnn_naive":
            return model.clone(cell=ReferenceLARNNCell.twin(model.cell))
        return model

    def data(self, seed: int = 0) -> tuple[jax.Array, jax.Array]:
        """Standard-normal inputs ``(batch, steps, inputs)`` and random labels ``(batch,)``."""
        key_x, key_y = jax.random.split(jax.random.key(seed))
        x = jax.random.normal(key_x, (self.batch, self.steps, self.inputs), jnp.float32)
        return x, jax.random.randint(key_y, (self.batch,), 0, self.classes)


class _RecordsUsage:
    """Records, per call, this process's CPU seconds in user and kernel mode and its minor page
    faults (``usage``)."""

    def __init__(self) -> None:
        self.usage: list[tuple[float, float, int]] = []

    def _record_usage(self, before: resource.struct_rusage) -> None:
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.usage.append(
            (
                after.ru_utime - before.ru_utime,
                after.ru_stime - before.ru_stime,
                after.ru_minflt - before.ru_minflt,
            )
        )

    def usage_summary(self) -> dict[str, float]:
        """Medians over the calls so far: CPU seconds in user and kernel mode, minor page faults.

        This process's own CPU time (all threads), so other load on the machine does not count;
        kernel time on the CPU backend is mostly the zero-filling of freshly mapped temporary
        buffers (one minor fault per 4 KiB page).
        """
        if not self.usage:
            return {}
        user, kernel, faults = np.median(np.asarray(self.usage), axis=0)
        return {
            "cpu_user_s": float(user),
            "cpu_sys_s": float(kernel),
            "minor_faults": float(faults),
        }


class TrainingBench(_RecordsUsage):
    """A model's training step on one fixed batch, to be called repeatedly.

    The step is the training's own (:func:`experiments.steps.make_train_step`: forward,
    backward, the optimiser update, the state donated), compiled ahead for this batch, on the
    state of :func:`experiments.steps.init_state`. Calling it runs one step (the state moves on,
    as in training) and waits for the result.

    Attributes:
      compile_seconds: time to trace, lower and compile the step.
      memory: :func:`memory_analysis` of the compiled step.
      parameters: number of trained parameters.
      usage: per call, CPU seconds in user and kernel mode and minor page faults.
    """

    def __init__(
        self,
        model: nn.Module,
        x: jax.Array,
        y: jax.Array,
        optimizer: optax.GradientTransformation | None = None,
        seed: int = 0,
    ):
        """``optimizer``: default, the training's for the paper's configuration."""
        if optimizer is None:
            optimizer = make_optimizer(_PAPER_CONFIG, steps_per_epoch=1)
        self.x, self.y = x, y
        self.rows = jnp.arange(len(y), dtype=jnp.int32)  # the batch is all of x
        self.steps_run = 0
        self.state = init_state(model, optimizer, x[:1], seed)
        self.parameters = parameter_count(self.state["params"])
        self.compiled, self.compile_seconds = timed_compile(
            make_train_step(model, optimizer), self.state, x, y, self.rows, self.steps_run
        )
        self.memory = memory_analysis(self.compiled)
        super().__init__()

    @classmethod
    def of(cls, workload: Workload) -> TrainingBench:
        """The bench of a :class:`Workload`, with the training's optimiser for its configuration
        (the length of an epoch only sets when the learning rate decays: one step here)."""
        optimizer = make_optimizer(workload.config(), steps_per_epoch=1)
        return cls(workload.model(), *workload.data(), optimizer=optimizer)

    def __call__(self) -> float:
        """One training step; returns the loss. Records the CPU time and page faults it took."""
        before = resource.getrusage(resource.RUSAGE_SELF)
        self.state, loss, _ = self.compiled(self.state, self.x, self.y, self.rows, self.steps_run)
        self.steps_run += 1
        value = float(jax.block_until_ready(loss))
        self._record_usage(before)
        return value


class InferenceBench(_RecordsUsage):
    """A model's compiled evaluation-mode forward pass on one fixed batch; ``usage`` as
    :class:`TrainingBench`'s."""

    def __init__(self, model: nn.Module, x: jax.Array, seed: int = 0):
        super().__init__()
        self.x = x
        self.variables = model.init(jax.random.key(seed), x[:1], deterministic=True)

        def infer(variables: PyTree, x: jax.Array) -> jax.Array:
            return cast(jax.Array, model.apply(variables, x, deterministic=True))

        self.compiled, self.compile_seconds = timed_compile(infer, self.variables, x)
        self.memory = memory_analysis(self.compiled)

    @classmethod
    def of(cls, workload: Workload) -> InferenceBench:
        """The bench of a :class:`Workload`."""
        return cls(workload.model(), workload.data()[0])

    def __call__(self) -> None:
        """One forward pass, waited for; records the CPU time and page faults it took."""
        before = resource.getrusage(resource.RUSAGE_SELF)
        jax.block_until_ready(self.compiled(self.variables, self.x))
        self._record_usage(before)


def parameter_count(tree: PyTree) -> int:
    """Number of scalars in a tree of arrays."""
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))
