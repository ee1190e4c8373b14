"""Pure functions: criss_cross."""
