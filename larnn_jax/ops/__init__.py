"""Faster ways to run the cells of :mod:`larnn_jax.cell`, which stays their reference.

* :mod:`larnn_jax.ops.window_scan`: a LARNN layer's scan with a gradient that keeps only the
  window's new entries (``O(T·H)`` memory), the window never moving.
* :mod:`larnn_jax.ops.fused_rnn`: ``nn.RNN`` for a ``LARNNCell`` on top of it, with the input
  projections hoisted out of the scan.
* :mod:`larnn_jax.ops.remat_rnn`: a training scan in rematerialised chunks, for any cell.

:class:`larnn_jax.LARNNLayer`'s ``scan`` chooses among them.
"""
