"""Layer 3, sampling: the guided sampling loop over a model, a solver, a combiner and conditions."""
