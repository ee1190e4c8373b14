"""Pure functions: danet."""
