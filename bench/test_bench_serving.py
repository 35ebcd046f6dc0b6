"""pytest-benchmark view of bench/cases_serving.py: ``pytest bench/ --benchmark-only``."""
from bench.cases_serving import CASES
from bench.pytest_support import parametrize, run_benchmark


@parametrize(CASES)
def test_serving(benchmark, bench_ctx, bandwidth, case, impl):
    run_benchmark(benchmark, bench_ctx, bandwidth, case, impl)
