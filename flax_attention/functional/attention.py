"""Pure functions: attention."""
