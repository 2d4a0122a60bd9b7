"""Benchmarks (not tests): train-step throughput against a PyTorch peer, the host input pipeline,
and the analytic FLOP count behind model-FLOPs utilisation. See docs/benchmarks.md.

  python -m benchmarks.step --help
  python -m benchmarks.input_pipeline --help
"""
