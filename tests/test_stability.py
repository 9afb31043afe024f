"""Evaluation-mode stability of the cells: where ``BN_c`` sits decides whether states can explode.

In evaluation every batch norm is a fixed affine map with gain ``γ/σ``. With the default
``cell_norm_placement='output'`` the carried cell state ``c_t = f ⊙ c_{t-1} + i ⊙ g`` never passes
through a norm, so ``|c_t| ≤ |c_{t-1}| + 1 ≤ t + 1`` whatever the statistics; with the paper's
``'carried'`` placement the gain multiplies the state at every step. The tests make the running
statistics adversarial (variances near zero: every gain about 300) and the inputs large, run
thousands of steps in float32, and check the bound and the outputs' finiteness.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cell_cases import randomised

from larnn_jax import BNLSTMCell, LARNNCell

STEPS = 3000
BATCH, INPUTS, FEATURES = 4, 3, 6
#: Running variance of every norm: the gain ``γ / sqrt(var + 1e-5)`` is about 300 for ``γ ≈ 1``.
ADVERSARIAL_VARIANCE = 1e-7
INPUT_SCALE = 100.0


def make_cell(kind: str, placement: str) -> LARNNCell | BNLSTMCell:
    """A small cell in evaluation mode with batch norm, ``BN_c`` at ``placement``."""
    if kind == "larnn":
        return LARNNCell(FEATURES, num_heads=2, window_size=4, cell_norm_placement=placement)
    return BNLSTMCell(FEATURES, cell_norm_placement=placement)


def adversarial_variables(cell: LARNNCell | BNLSTMCell) -> dict:
    """Random parameters and running means, and running variances of ``ADVERSARIAL_VARIANCE``."""
    carry = cell.initialize_carry(jax.random.key(0), (BATCH, INPUTS))
    shapes = jax.eval_shape(cell.init, jax.random.key(0), carry, jnp.zeros((BATCH, INPUTS)))
    variables = randomised(shapes, seed=3)
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            np.full_like(leaf, ADVERSARIAL_VARIANCE) if path[-1].key == "var" else leaf
        ),
        variables["batch_stats"],
    )
    return variables


def cell_states_and_outputs(cell: LARNNCell | BNLSTMCell) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``cell`` for ``STEPS`` steps on inputs ``N(0, INPUT_SCALE²)`` in evaluation mode.

    Returns:
      The carried cell state ``c_t`` and the output ``h_t`` of every step, both ``(T, B, H)``.
    """
    variables = adversarial_variables(cell)
    x = INPUT_SCALE * np.random.default_rng(4).normal(size=(STEPS, BATCH, INPUTS))

    def step(carry, x_t):
        carry, h = cell.apply(variables, carry, x_t)
        c = carry.c if isinstance(cell, LARNNCell) else carry[0]
        return carry, (c, h)

    carry = cell.initialize_carry(jax.random.key(0), (BATCH, INPUTS))
    _, (c, h) = jax.jit(lambda x: jax.lax.scan(step, carry, x))(jnp.asarray(x, jnp.float32))
    return np.asarray(c), np.asarray(h)


def first_violations(c: np.ndarray, h: np.ndarray) -> dict[str, int | None]:
    """The first step with a non-finite output, and the first with ``max |c_t| > t + 1``
    (``None`` where there is none)."""
    non_finite = ~np.all(np.isfinite(h), axis=(1, 2))  # (T,)
    over = ~(np.abs(c).max(axis=(1, 2)) <= np.arange(STEPS) + 1.0)  # NaN states count as over
    return {
        "non_finite_output": int(np.argmax(non_finite)) if non_finite.any() else None,
        "state_over_bound": int(np.argmax(over)) if over.any() else None,
    }


@pytest.mark.parametrize("kind", ["larnn", "bnlstm"])
def test_output_placement_is_stable_under_adversarial_statistics(kind):
    """``'output'``: every output finite over 3000 steps and ``|c_t| ≤ t + 1`` at every step."""
    c, h = cell_states_and_outputs(make_cell(kind, "output"))
    assert first_violations(c, h) == {"non_finite_output": None, "state_over_bound": None}
    # The statistics really are adversarial: the outputs are far from the unit scale.
    assert np.abs(h).max() > 1e4


@pytest.mark.parametrize("kind", ["larnn", "bnlstm"])
def test_carried_placement_fails_the_same_check(kind):
    """The paper's ``'carried'`` placement: the state leaves the bound at once and the outputs
    overflow within a few dozen steps."""
    violations = first_violations(*cell_states_and_outputs(make_cell(kind, "carried")))
    assert violations["state_over_bound"] == 0
    assert violations["non_finite_output"] is not None
    assert violations["non_finite_output"] < 100
