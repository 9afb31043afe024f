"""The scan switch: one function decides which scan a layer runs, and says why it cannot."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from larnn_jax import BNLSTMCell, LARNNCell, LARNNLayer, scans
from larnn_jax.scans import choose_scan

LARNN = LARNNCell(4, num_heads=2, window_size=3)


class RedefinedStep(LARNNCell):
    """A subclass whose step is not LARNNCell's: the fused scans would not compute it."""

    def step(self, carry, terms):
        return super().step(carry, terms)


@pytest.mark.parametrize(
    "cell, training, expected",
    [
        (LARNN, True, {"auto": "fused", "fused": "fused", "plain": "plain", "remat": "remat"}),
        (LARNN, False, {"auto": "fused", "fused": "fused", "plain": "plain", "remat": "plain"}),
        (BNLSTMCell(4), True, {"auto": "plain", "plain": "plain", "remat": "remat"}),
        (nn.LSTMCell(4), False, {"auto": "plain", "plain": "plain", "remat": "plain"}),
        (RedefinedStep(4, num_heads=2, window_size=3), True, {"auto": "plain"}),
    ],
    ids=["larnn-train", "larnn-eval", "bnlstm", "lstm", "larnn-subclass"],
)
def test_choice_for_each_cell_and_mode(monkeypatch, cell, training, expected):
    monkeypatch.setenv("LARNN_JAX_NATIVE", "0")
    chosen = {scan: choose_scan(scan, cell, training=training) for scan in expected}
    assert chosen == expected


@pytest.mark.parametrize("cell", [BNLSTMCell(4), RedefinedStep(4, num_heads=2, window_size=3)])
@pytest.mark.parametrize("scan", ["fused", "native"])
def test_a_fused_scan_for_another_cell_is_an_error_naming_the_fix(cell, scan):
    with pytest.raises(ValueError) as raised:
        choose_scan(scan, cell, training=True)
    assert str(raised.value) == (
        f"scan={scan!r} runs LARNNCell's own step, and {type(cell).__name__} is not a LARNNCell "
        "(or redefines its step): use scan='auto', 'plain' or 'remat'"
    )


def test_a_layer_reports_an_impossible_scan_when_called():
    layer = LARNNLayer(BNLSTMCell(4), scan="fused")
    with pytest.raises(ValueError, match="scan='fused' runs LARNNCell's own step"):
        layer.init(jax.random.key(0), jnp.ones((2, 3, 4)))


def test_auto_logs_its_choice_and_the_switch(monkeypatch, caplog):
    monkeypatch.setenv("LARNN_JAX_NATIVE", "0")
    scans._log_choice.cache_clear()  # logged once per process: forget earlier tests' choices
    with caplog.at_level(logging.INFO, logger="larnn_jax"):
        choose_scan("auto", LARNN, training=True)
    assert "scan='auto' runs the XLA fused scan (native step: LARNN_JAX_NATIVE=0)" in caplog.text
