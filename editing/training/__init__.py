"""Training small models from scratch on generated data (offline, CPU)."""
