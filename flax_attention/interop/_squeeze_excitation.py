"""squeeze_excitation: torch -> Flax converters (see torch.py)."""
