"""Weight files in and out: diffusers/transformers layouts and the formats other tools load."""
