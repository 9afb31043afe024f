"""Settings for the whole test suite.

Matrix products in float32 at full precision on every backend: on GPUs, JAX's default lets them
use TF32 (a relative error of about 1e-3), which the float32 tolerances of these tests, set for
float32 arithmetic, do not allow for. The CPU backend computes them at full precision anyway.
"""

import logging

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def restore_logging():
    """Undoes the command line's logging set-up, whose handler writes to the stderr of the test
    that called it (``pytestmark = pytest.mark.usefixtures("restore_logging")``)."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)
