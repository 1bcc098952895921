"""One forward script per model family, each mirroring one upstream modeling file (named at its top)."""
