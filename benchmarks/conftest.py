"""Benchmarks: ``pytest benchmarks/ --benchmark-only`` (excluded from the plain test run).

Providers: the reference eagerly and under ``torch.compile`` (compile time excluded: the
first call happens in warm-up), and every compiled backend available on the device
(``cpu``, ``cuda``, ``triton``; the Triton interpreter is not benchmarked). Each result
carries analytic FLOPs and bytes, achieved GFLOP/s and GB/s, peak memory, device and
versions in ``extra_info``; ``--benchmark-json`` writes them out.
"""
