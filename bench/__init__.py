"""pyeditor benchmark suite.

Run ``python -m bench`` (``make bench``), or ``pytest bench/ --benchmark-only``.

Layout, one job per file:
  registry.py      Case / Prepared / Context types and discovery of ``cases_*.py``
  timing.py        the wall-clock timer (warm-up, perf_counter samples, median)
  roofline.py      this machine's copy / read / write memory bandwidth
  contention.py    other processes' CPU use while we measure (the machine is shared)
  machine.py       machine and software description for the JSON
  runner.py        runs one case: times every impl, errors vs reference, GB/s, speedups
  report.py        the stdout table and the JSON file
  pytest_support.py  the same cases as pytest-benchmark tests
  cases_<family>.py  one module per kernel family, each with a ``CASES`` list
  __main__.py      the command line
"""
