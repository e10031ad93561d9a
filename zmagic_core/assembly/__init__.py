"""Layer 5, assembly: a recipe file checked against the registry and built into a Pipeline."""
