"""pytest-benchmark view of bench/cases_quant.py: ``pytest bench/ --benchmark-only``."""
from bench.cases_quant import CASES
from bench.pytest_support import parametrize, run_benchmark


@parametrize(CASES)
def test_packed_linear(benchmark, bench_ctx, bandwidth, case, impl):
    run_benchmark(benchmark, bench_ctx, bandwidth, case, impl)
