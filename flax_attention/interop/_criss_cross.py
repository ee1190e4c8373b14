"""criss_cross: torch -> Flax converters (see torch.py)."""
