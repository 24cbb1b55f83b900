"""One module per experiment; each defines EXPERIMENT (and ORDER, its place in the suite)."""
