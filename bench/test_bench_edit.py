"""pytest-benchmark view of bench/cases_edit.py: ``pytest bench/ --benchmark-only``."""
from bench.cases_edit import CASES
from bench.pytest_support import parametrize, run_benchmark


@parametrize(CASES)
def test_apply_edit(benchmark, bench_ctx, bandwidth, case, impl):
    run_benchmark(benchmark, bench_ctx, bandwidth, case, impl)
