"""Pure functions: non_local."""
