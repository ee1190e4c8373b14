"""spatial_transformer: torch -> Flax converters (see torch.py)."""
