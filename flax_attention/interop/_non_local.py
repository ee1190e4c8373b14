"""non_local: torch -> Flax converters (see torch.py)."""
