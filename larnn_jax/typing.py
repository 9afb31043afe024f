"""Type aliases shared across the package and the pipeline."""

from __future__ import annotations

from typing import Any

#: A nested structure of arrays (JAX's pytree): parameters, statistics, optimiser state.
PyTree = Any
#: A recurrent cell's carry: a pytree whose structure the cell defines.
Carry = Any
