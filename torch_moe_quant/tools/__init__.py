"""Small utilities shared by tests, benchmarks and the demo."""
