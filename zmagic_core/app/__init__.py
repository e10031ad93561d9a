"""Layer 6, the application: the `zmagic` command, run folders, the demo, plots and benchmarks."""
