"""danet: torch -> Flax converters (see torch.py)."""
