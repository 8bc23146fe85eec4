"""The train state's plain view of a model: one array per variable, keyed by its path.

The train-state packing of ``model.kernels = "reference"``: optax and the EMA update each
parameter leaf on its own (no ``flat_state.FlatPacking`` packing), which is what a
textbook Flax NNX trainer does. Keys are the variables' dotted paths
(``blocks.3.dw_conv.kernel``), the names ``weights.safetensors`` uses. Inside a jitted
step, ``TreePacking.merge`` puts the arrays back into the module tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from effnet_jax.model.efficientnet import eval_view, seed_free, train_view


def _key_name(path: tuple[Any, ...]) -> str:
    """'blocks.3.dw_conv.kernel' from a pytree path into an nnx.State (the Variable's own '.value' dropped)."""
    parts = [getattr(k, "key", getattr(k, "idx", None)) for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]
    return ".".join(str(p) for p in parts)


def _named(state: nnx.State) -> tuple[dict[str, jax.Array], tuple[str, ...], Any]:
    """({name: array}, the names in leaf order, the treedef that puts them back)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = tuple(_key_name(path) for path, _ in leaves)
    return dict(zip(names, (leaf for _, leaf in leaves), strict=True)), names, treedef


@dataclasses.dataclass(frozen=True)
class TreePacking:
    """A model's structure plus where each named array goes back (same interface as FlatPacking).

    Parameters are ``{name: array}`` over every ``nnx.Param``, BatchNorm running
    statistics ``{name: array}`` over every ``nnx.BatchStat``.
    """

    graphdef: nnx.GraphDef
    eval_graphdef: nnx.GraphDef
    rest: nnx.State  # dropout RNG streams: constants of the program, reseeded by every train step
    names: dict[str, tuple[str, ...]]
    treedefs: dict[str, Any]

    @classmethod
    def create(cls, model: nnx.Module) -> tuple[TreePacking, dict[str, jax.Array], dict[str, jax.Array]]:
        """(packing, parameters by name, BatchNorm statistics by name)."""
        graphdef, params, stats, rest = nnx.split(train_view(model), nnx.Param, nnx.BatchStat, ...)
        eval_graphdef = nnx.split(eval_view(model), nnx.Param, nnx.BatchStat, ...)[0]
        params, param_names, param_def = _named(params)
        stats, stat_names, stat_def = _named(stats)
        packing = cls(graphdef, eval_graphdef, seed_free(rest), {"params": param_names, "stats": stat_names},
                     {"params": param_def, "stats": stat_def})
        return packing, params, stats

    @property
    def weight_decay_mask(self) -> dict[str, bool]:
        """optax's mask over the parameters: conv and dense weights and biases, not BatchNorm scale / offset."""
        return {n: not any(part.endswith("_bn") for part in n.split(".")) for n in self.names["params"]}

    def _state(self, kind: str, arrays: dict[str, jax.Array]) -> nnx.State:
        return jax.tree.unflatten(self.treedefs[kind], [arrays[n] for n in self.names[kind]])

    def merge(self, params: dict[str, jax.Array], stats: dict[str, jax.Array], *, train: bool = True) -> nnx.Module:
        """A module over (traced) named arrays: the train view, or the eval view."""
        return nnx.merge(self.graphdef if train else self.eval_graphdef, self._state("params", params),
                         self._state("stats", stats), self.rest, copy=True)

    @staticmethod
    def stats_of(model: nnx.Module) -> dict[str, jax.Array]:
        """The module's BatchNorm statistics by name (as ``create`` returns them)."""
        return _named(nnx.state(model, nnx.BatchStat))[0]
