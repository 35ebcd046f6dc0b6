"""pytest-benchmark view of bench/cases_hyper.py: ``pytest bench/ --benchmark-only``."""
from bench.cases_hyper import CASES
from bench.pytest_support import parametrize, run_benchmark


@parametrize(CASES)
def test_hyper(benchmark, bench_ctx, bandwidth, case, impl):
    run_benchmark(benchmark, bench_ctx, bandwidth, case, impl)
