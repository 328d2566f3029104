"""Training data: image folders with captions or prompt templates, and the grain pipeline."""
