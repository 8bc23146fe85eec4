"""Experiments built on effnet_jax: the compound-scaling grid search and studies."""
