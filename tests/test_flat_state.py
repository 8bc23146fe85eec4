"""FlatPacking: the train state's flat vectors map back to the same model, and nothing seed-dependent is compiled."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effnet_jax.configs import digits
from effnet_jax.model.arch import TINY
from effnet_jax.model.efficientnet import create_model, eval_view
from effnet_jax.training import recipe
from effnet_jax.training.flat_state import WEIGHT_DECAY_MASK, FlatPacking


def tiny(seed=0):
    return create_model("b0", 10, seed, network=TINY, drop_path_rate=0.2)


def test_merge_restores_every_variable_and_the_forward():
    model = tiny()
    packing, params, stats = FlatPacking.create(model)
    assert set(params) == set(WEIGHT_DECAY_MASK)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert params["decay"].size + params["no_decay"].size == n_params
    # BatchNorm scale/offset are exactly the no-decay vector.
    bn = [x.size for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
          if any(str(getattr(k, "key", k)).endswith("_bn") for k in p)]
    assert params["no_decay"].size == sum(bn) > 0
    back = packing.merge(params, stats, train=False)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param, nnx.BatchStat)),
                    jax.tree.leaves(nnx.state(back, nnx.Param, nnx.BatchStat)), strict=True):
        np.testing.assert_array_equal(a, b)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    np.testing.assert_array_equal(eval_view(model)(x), back(x))
    # stats_of reads the statistics back in create's order.
    np.testing.assert_array_equal(FlatPacking.stats_of(back), stats)


def test_train_step_program_does_not_depend_on_the_seed():
    c = digits.get_config()
    c.model.network, c.model.drop_path_rate, c.batch_size = "tiny", 0.2, 4
    texts = []
    for seed in (0, 1):
        packing, params, stats = FlatPacking.create(tiny(seed))
        schedule = recipe.learning_rate_schedule(c.optimizer, c.batch_size, 10, 100)
        tx = recipe.make_optimizer(c.optimizer, schedule, packing.weight_decay_mask)
        weights = recipe.Weights(params, stats)
        state = recipe.TrainState(step=jnp.zeros((), jnp.int32), weights=weights, opt=tx.init(params),
                                  dropout_key=jax.random.key_data(jax.random.key(seed)), ema=weights)
        train_step = recipe.make_train_step(packing, tx, schedule, c, 10)
        batch = {"image": jnp.zeros((4, 32, 32, 3)), "label": jnp.zeros((4,), jnp.int32)}
        texts.append(jax.jit(train_step).lower(state, batch).as_text())
    assert texts[0] == texts[1]


def test_train_step_draws_new_dropout_masks_at_every_step_and_for_every_seed():
    """The same weights and batch give another loss at another step or dropout key (dropout 0.5 on the
    head, drop path 0.2): the masks come from the state, not from a key compiled into the step."""
    c = digits.get_config()
    c.model.network, c.model.drop_path_rate, c.batch_size = "tiny", 0.2, 8
    model = create_model("b0", 10, 0, network=TINY, drop_path_rate=0.2, dropout=0.5)
    packing, params, stats = FlatPacking.create(model)
    schedule = recipe.learning_rate_schedule(c.optimizer, c.batch_size, 10, 100)
    tx = recipe.make_optimizer(c.optimizer, schedule, packing.weight_decay_mask)
    weights = recipe.Weights(params, stats)
    train_step = jax.jit(recipe.make_train_step(packing, tx, schedule, c, 10))
    batch = {"image": jax.random.normal(jax.random.key(1), (8, 32, 32, 3)), "label": jnp.arange(8) % 10}

    def loss(step, seed):
        state = recipe.TrainState(step=jnp.asarray(step, jnp.int32), weights=weights, opt=tx.init(params),
                                  dropout_key=jax.random.key_data(jax.random.key(seed)), ema=None)
        return float(train_step(state, batch)[1]["loss"])

    assert loss(0, 0) == loss(0, 0)  # a function of (key, step): a resumed run redraws the same masks
    assert loss(0, 0) != loss(1, 0)
    assert loss(0, 0) != loss(0, 1)
