"""``NaiveLARNNCell`` (benchmarks) gives ``LARNNCell``'s results on ``LARNNCell``'s variables.

Both cells run under ``LARNNLayer`` over ``T = 2k + 3`` steps (the window fills up and slides)
on the same randomised variables; outputs, final carries and, in training, the updated running
statistics must agree. The comparison runs in float64 (scoped with ``jax.enable_x64``), where
both ways of computing must agree to far below float32 rounding, and once in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from benchmarks.naive_cell import NaiveCarry, NaiveLARNNCell, head_membership, naive_twin
from larnn_jax import LARNNCell, LARNNLayer

RTOL_FLOAT64 = 1e-9
RTOL_FLOAT32 = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    """A cell configuration and input shape ``(batch, 2·window + 3, inputs)``."""

    pe: bool = False
    mode: str = "residual"
    norm: str = "batch"
    act: bool = True
    window: int = 3
    features: int = 6
    heads: int = 3
    batch: int = 5
    inputs: int = 4

    def cell(self, dtype: np.dtype) -> LARNNCell:
        """The library's cell, dropout off."""
        return LARNNCell(
            self.features,
            num_heads=self.heads,
            window_size=self.window,
            mode=self.mode,
            use_positional_encoding=self.pe,
            activation_on_keys_and_values=self.act,
            norm=self.norm,
            param_dtype=dtype,
        )


def randomised(variables: dict, seed: int = 0) -> dict:
    """Every leaf replaced by a seeded random value on its natural scale.

    Kernels ~ N(0, 1/fan_in); norm scales in 1 ± 0.3; biases and running means in ± 0.3;
    running variances in [0.5, 1.5]. Initial values (ones, zeros) would hide a term that is
    missing or applied twice.
    """
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: jax.Array) -> np.ndarray:
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.normal(size=shape) / np.sqrt(shape[0])
        elif name == "scale":
            value = rng.uniform(0.7, 1.3, shape)
        elif name == "var":
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = rng.uniform(-0.3, 0.3, shape)
        return np.asarray(value, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


def run_both(case: Case, dtype: np.dtype) -> dict[str, tuple[dict, dict]]:
    """Results of ``LARNNCell`` and ``NaiveLARNNCell`` on the same variables and inputs.

    Returns ``{"train": (cached, naive), "eval": (cached, naive)}``, each result a dict
    ``{"ys": (B,T,H), "h": (B,H), "c": (B,H), "stats": updated batch_stats (train only)}``.
    """
    with jax.enable_x64(np.dtype(dtype) == np.float64):
        cell = case.cell(dtype)
        steps = 2 * case.window + 3
        x = np.random.default_rng(1).normal(size=(case.batch, steps, case.inputs)).astype(dtype)
        layers = [LARNNLayer(c, return_carry=True) for c in (cell, naive_twin(cell))]
        variables = randomised(layers[0].init(jax.random.key(0), x, deterministic=False))
        results: dict[str, list[dict]] = {"train": [], "eval": []}
        for layer in layers:
            (carry, ys), updates = layer.apply(
                variables, x, deterministic=False, mutable=["batch_stats"]
            )
            stats = updates.get("batch_stats", {})
            results["train"].append({"ys": ys, "h": carry.h, "c": carry.c, "stats": stats})
            carry, ys = layer.apply(variables, x, deterministic=True)
            results["eval"].append({"ys": ys, "h": carry.h, "c": carry.c})
        as_numpy = jax.tree_util.tree_map(np.asarray, results)
        return {mode: (pair[0], pair[1]) for mode, pair in as_numpy.items()}


def assert_close(cached: dict, naive: dict, rtol: float) -> None:
    """``max|naive - cached| <= rtol · max|cached|`` for every array of the two results."""
    leaves_cached = jax.tree_util.tree_leaves_with_path(cached)
    leaves_naive = jax.tree_util.tree_leaves(naive)
    assert len(leaves_cached) == len(leaves_naive)
    for (path, expected), actual in zip(leaves_cached, leaves_naive, strict=True):
        assert actual.shape == expected.shape, jax.tree_util.keystr(path)
        error = np.abs(actual - expected).max() / np.abs(expected).max()
        assert error <= rtol, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"


CASES = {
    "residual": Case(),
    "layer-pe": Case(pe=True, mode="layer"),
    "window1": Case(window=1, pe=True),
    "one-head-noact": Case(heads=1, act=False, pe=True),
    "layer-norm": Case(norm="layer", pe=True),
    "no-norm": Case(norm="none", mode="layer"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_results_float64(name: str) -> None:
    """Outputs, carries and updated statistics agree to far below float32 rounding."""
    results = run_both(CASES[name], np.float64)
    if CASES[name].norm == "batch":
        assert results["train"][0]["stats"], "training with batch norm updates statistics"
    for cached, naive in results.values():
        assert_close(cached, naive, RTOL_FLOAT64)


def test_same_results_float32() -> None:
    """The float32 cells agree to a relative 1e-5 (a batch of 16 keeps the norms well scaled)."""
    for cached, naive in run_both(Case(pe=True, batch=16), np.float32).values():
        assert_close(cached, naive, RTOL_FLOAT32)


def test_same_variables_as_larnn_cell() -> None:
    """The naive cell's own ``init`` creates the same variable tree (names, shapes, dtypes)."""
    cell = Case(pe=True).cell(np.float32)
    x = np.zeros((2, 7, 4), np.float32)
    key = jax.random.key(0)

    def shapes(layer: LARNNLayer) -> dict:
        return jax.eval_shape(functools.partial(layer.init, deterministic=False), key, x)

    assert shapes(LARNNLayer(naive_twin(cell))) == shapes(LARNNLayer(cell))


def test_twin_and_carry() -> None:
    """``naive_twin`` copies every attribute; the carry holds the raw window of ``k - 1``."""
    cell = LARNNCell(6, num_heads=2, window_size=4, mode="layer", dropout_rate=0.1)
    twin = naive_twin(cell)
    assert isinstance(twin, NaiveLARNNCell)
    for field in dataclasses.fields(LARNNCell):
        if field.init and field.name not in ("parent", "name"):
            assert getattr(twin, field.name) == getattr(cell, field.name), field.name
    carry = twin.initialize_carry(jax.random.key(0), (3, 5))
    assert isinstance(carry, NaiveCarry)
    assert carry.window.shape == (3, 3, 6)
    assert carry.h.shape == carry.c.shape == (3, 6)
    np.testing.assert_array_equal(carry.length, np.zeros(3))


def test_head_membership() -> None:
    """Column ``h`` marks the contiguous features of head ``h``."""
    expected = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(head_membership(6, 3), expected)
