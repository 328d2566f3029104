"""Experiment configs, one per method x base model, each with a `:tiny` variant.

Shipped inside the package as `persona_jax.configs`, so `--config NAME[:tiny]` works from an
installed wheel as well as from a checkout.
"""
