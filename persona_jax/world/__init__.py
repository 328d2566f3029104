"""The toy world: scenes (the image generator), and later its models and metrics."""
