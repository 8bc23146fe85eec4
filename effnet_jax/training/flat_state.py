"""The train state's view of a model: its variables as a few flat vectors.

optax and the EMA update every parameter leaf with kernels of their own; over B0's
213 parameters and 98 BatchNorm statistics that was half of the ~2,900 kernels of
a train step, and XLA:CPU compile time grows with the kernel count (measured:
docs/benchmarks.md). On flat vectors those updates are a handful of kernels.
Inside a jitted step, ``FlatPacking.merge`` slices the vectors back into the module
tree; the slices fuse into their consumers. The train-state packing of ``model.kernels =
"fast"``; ``tree_state.TreePacking`` is the per-leaf one of ``"reference"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.flatten_util import ravel_pytree

from effnet_jax.model.efficientnet import eval_view, is_bn_param, seed_free, train_view

# Which of the flat parameter vectors (FlatPacking) weight decay applies to: conv and dense
# weights and biases yes, BatchNorm scale and offset no.
WEIGHT_DECAY_MASK = {"decay": True, "no_decay": False}


@dataclasses.dataclass(frozen=True)
class FlatPacking:
    """A model's structure plus how its flat vectors map back to its variables.

    Parameters are two vectors, ``decay`` (conv and dense weights and biases) and
    ``no_decay`` (BatchNorm scale and offset), so that weight decay's mask is a
    two-leaf tree; BatchNorm running statistics are a third vector.
    """

    graphdef: nnx.GraphDef
    eval_graphdef: nnx.GraphDef
    rest: nnx.State  # dropout RNG streams: constants of the program, reseeded by every train step
    unravel: dict[str, Callable[[jax.Array], Any]]

    @property
    def weight_decay_mask(self) -> dict[str, bool]:
        """optax's mask over the parameter vectors: decay the ``decay`` vector only."""
        return WEIGHT_DECAY_MASK

    @classmethod
    def create(cls, model: nnx.Module) -> tuple[FlatPacking, dict[str, jax.Array], jax.Array]:
        """(packing, {"decay": vector, "no_decay": vector}, BatchNorm statistics vector)."""
        graphdef, no_decay, decay, stats, rest = nnx.split(train_view(model), is_bn_param, nnx.Param,
                                                           nnx.BatchStat, ...)
        eval_graphdef = nnx.split(eval_view(model), is_bn_param, nnx.Param, nnx.BatchStat, ...)[0]
        vectors, unravel = {}, {}
        for name, tree in (("decay", decay), ("no_decay", no_decay), ("stats", stats)):
            vectors[name], unravel[name] = ravel_pytree(tree)
        packing = cls(graphdef, eval_graphdef, seed_free(rest), unravel)
        return packing, {"decay": vectors["decay"], "no_decay": vectors["no_decay"]}, vectors["stats"]

    def merge(self, params: dict[str, jax.Array], stats: jax.Array, *, train: bool = True) -> nnx.Module:
        """A module over (traced) flat vectors: the train view, or the eval view."""
        return nnx.merge(self.graphdef if train else self.eval_graphdef, self.unravel["no_decay"](params["no_decay"]),
                         self.unravel["decay"](params["decay"]), self.unravel["stats"](stats), self.rest, copy=True)

    @staticmethod
    def stats_of(model: nnx.Module) -> jax.Array:
        """The module's BatchNorm statistics as one vector (same order as ``create``)."""
        return ravel_pytree(nnx.state(model, nnx.BatchStat))[0]
