"""larnn_jax: the Linear Attention Recurrent Neural Network (LARNN) in JAX/Flax."""

from larnn_jax.attention import positional_encoding
from larnn_jax.cell import BNLSTMCell, LARNNCarry, LARNNCell

__all__ = ["BNLSTMCell", "LARNNCarry", "LARNNCell", "positional_encoding"]
__version__ = "0.1.0"
