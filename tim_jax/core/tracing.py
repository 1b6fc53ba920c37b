"""Building large modules under a trace (``nnx.eval_shape``, ``jax.jit``).

Each key an ``nnx.Rngs`` draws inside a trace updates its counter, and
flax (0.12) then reads the ``sharding`` of the new traced value; JAX's
refusal builds an error message that walks every equation traced so far.
Drawn once per parameter, that is quadratic in a model's size (tens of
seconds for an abstract XL model on two cores). ``apart`` builds a
sub-module in a trace of its own, so that each walk stays one block long.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flax import nnx
import jax

M = TypeVar("M")


def tracing(rngs: nnx.Rngs) -> bool:
  """Whether ``rngs`` holds traced values (it is used under a trace)."""
  return any(
    isinstance(leaf, jax.core.Tracer)
    for leaf in jax.tree.leaves(nnx.state(rngs))
  )


def apart(make: Callable[[nnx.Rngs], M]) -> Callable[[nnx.Rngs], M]:
  """``make`` as a builder that, under a trace, runs in a nested one.

  Outside a trace it is ``make`` itself. Under one, ``make(rngs)`` is
  traced by its own ``nnx.jit`` (``inline``: the outer program is the
  same as without it) and ``rngs`` advances exactly as if ``make`` had run
  in place, so the keys drawn, and a traced initialisation's values, do
  not change. Reusing the returned builder for identical sub-modules (a
  stack of blocks) lets JAX trace them once.
  """
  nested = nnx.jit(make, inline=True)

  def build(rngs: nnx.Rngs) -> M:
    return nested(rngs) if tracing(rngs) else make(rngs)

  return build
