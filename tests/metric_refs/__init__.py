"""Independent float64 NumPy references of the metric conventions (tests and benchmarks)."""
