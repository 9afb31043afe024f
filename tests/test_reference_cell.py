"""``ReferenceLARNNCell`` (the definition) gives ``LARNNCell``'s results on the same variables.

Both cells run under ``LARNNLayer`` over ``T = 2k + 5`` steps (the window fills up and slides)
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
from cell_cases import CellCase, randomised

from larnn_jax import BNLSTMCell, LARNNCell, LARNNLayer
from larnn_jax.reference import ReferenceCarry, ReferenceLARNNCell

RTOL_FLOAT64 = 1e-9
RTOL_FLOAT32 = 1e-5


def run_both(case: CellCase, dtype: np.dtype) -> dict[str, tuple[dict, dict]]:
    """Results of ``LARNNCell`` and ``ReferenceLARNNCell`` on the same variables and inputs.

    Returns ``{"train": (cached, reference), "eval": (cached, reference)}``, each result a dict
    ``{"ys": (B,T,H), "h": (B,H), "c": (B,H), "stats": updated batch_stats (train only)}``.
    """
    with jax.enable_x64(np.dtype(dtype) == np.float64):
        cell = case.cell(dtype)
        shape = (case.batch, case.steps, case.inputs)
        x = np.random.default_rng(1).normal(size=shape).astype(dtype)
        layers = [
            LARNNLayer(cell, return_carry=True),
            LARNNLayer(ReferenceLARNNCell.twin(cell), return_carry=True),
        ]
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


def assert_close(cached: dict, reference: dict, rtol: float) -> None:
    """``max|reference - cached| <= rtol · max|cached|`` for every array of the two results."""
    leaves_cached = jax.tree_util.tree_leaves_with_path(cached)
    leaves_reference = jax.tree_util.tree_leaves(reference)
    assert len(leaves_cached) == len(leaves_reference)
    for (path, expected), actual in zip(leaves_cached, leaves_reference, strict=True):
        assert actual.shape == expected.shape, jax.tree_util.keystr(path)
        error = np.abs(actual - expected).max() / np.abs(expected).max()
        assert error <= rtol, f"{jax.tree_util.keystr(path)}: relative error {error:.2e}"


CASES = {
    "residual": CellCase(pe=False),
    "layer-pe": CellCase(mode="layer"),
    "window1": CellCase(window=1),
    "one-head-noact": CellCase(heads=1, act=False),
    "layer-norm": CellCase(norm="layer"),
    "no-norm": CellCase(norm="none", mode="layer", pe=False),
}


#: The cases of the default suite; the slow suite runs them all.
FAST_CASES = ("residual", "layer-pe")


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=() if n in FAST_CASES else pytest.mark.slow) for n in CASES],
)
def test_same_results_float64(name: str) -> None:
    """Outputs, carries and updated statistics agree to far below float32 rounding."""
    results = run_both(CASES[name], np.float64)
    if CASES[name].norm == "batch":
        assert results["train"][0]["stats"], "training with batch norm updates statistics"
    for cached, reference in results.values():
        assert_close(cached, reference, RTOL_FLOAT64)


@pytest.mark.parametrize(
    "pe", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["pe", "nope"]
)
def test_same_results_float32(pe: bool) -> None:
    """The float32 cells agree to a relative 1e-5 (a batch of 16 keeps the norms well scaled)."""
    for cached, reference in run_both(CellCase(pe=pe, batch=16), np.float32).values():
        assert_close(cached, reference, RTOL_FLOAT32)


def test_same_variables_as_larnn_cell() -> None:
    """The reference cell's own ``init`` creates the same variable tree (names, shapes, dtypes)."""
    cell = CellCase().cell(np.float32)
    x = np.zeros((2, 7, 4), np.float32)
    key = jax.random.key(0)

    def shapes(layer: LARNNLayer) -> dict:
        return jax.eval_shape(functools.partial(layer.init, deterministic=False), key, x)

    assert shapes(LARNNLayer(ReferenceLARNNCell.twin(cell))) == shapes(LARNNLayer(cell))


def test_twin_and_carry() -> None:
    """``twin`` copies every attribute; the carry holds the raw window of ``k - 1``."""
    cell = LARNNCell(6, num_heads=2, window_size=4, mode="layer", dropout_rate=0.1)
    twin = ReferenceLARNNCell.twin(cell)
    assert isinstance(twin, ReferenceLARNNCell)
    for field in dataclasses.fields(LARNNCell):
        if field.init and field.name not in ("parent", "name"):
            assert getattr(twin, field.name) == getattr(cell, field.name), field.name
    with pytest.raises(TypeError, match="the reference cell twins a LARNNCell, not a BNLSTMCell"):
        ReferenceLARNNCell.twin(BNLSTMCell(6))
    carry = twin.initialize_carry(jax.random.key(0), (3, 5))
    assert isinstance(carry, ReferenceCarry)
    assert carry.window.shape == (3, 3, 6)
    assert carry.h.shape == carry.c.shape == (3, 6)
    np.testing.assert_array_equal(carry.count, np.zeros(3))


def test_same_dropout_masks_under_the_plain_scan() -> None:
    """Both cells draw a step's dropout in the same order from the same rng stream: under the
    plain scan, with every dropout on, they give the same results."""
    case = CellCase(pe=False)
    with jax.enable_x64(True):
        cell = dataclasses.replace(
            case.cell(np.float64),
            dropout_rate=0.3,
            kv_dropout_rate=0.2,
            attention_dropout_rate=0.25,
        )
        x = np.random.default_rng(1).normal(size=(case.batch, case.steps, case.inputs))
        layers = [
            LARNNLayer(cell, scan="plain"),
            LARNNLayer(ReferenceLARNNCell.twin(cell), scan="plain"),
        ]
        variables = randomised(layers[0].init(jax.random.key(0), x, deterministic=True))
        ys = [
            layer.apply(
                variables,
                x,
                deterministic=False,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(2)},
            )[0]
            for layer in layers
        ]
        no_dropout = LARNNLayer(case.cell(np.float64), scan="plain").apply(
            variables, x, deterministic=False, mutable=["batch_stats"]
        )
    assert_close({"ys": np.asarray(ys[0])}, {"ys": np.asarray(ys[1])}, RTOL_FLOAT64)
    assert not np.allclose(ys[0], no_dropout[0])  # the dropout did drop something
