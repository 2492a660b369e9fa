"""Speed benchmarks; run each with `python -m benchmarks.<module>`."""
