"""Pure functions: spatial."""
