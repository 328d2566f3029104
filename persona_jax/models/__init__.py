"""Flax linen networks of Stable Diffusion, with diffusers/transformers parameter names."""
