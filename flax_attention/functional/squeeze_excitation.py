"""Pure functions: squeeze_excitation."""
