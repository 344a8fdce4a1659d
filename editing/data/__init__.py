"""Project data: the default model's conversion, country facts, the synthetic fact world."""
