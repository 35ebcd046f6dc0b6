"""pyeditor benchmark suite.

Run ``python -m bench`` (``make bench``), or ``pytest bench/ --benchmark-only``;
``python -m bench report`` writes BENCHMARKS.md from the result files, ``compare OLD NEW`` and
``plot`` read them too.

Layout, one job per file:
  registry.py      Case / Prepared / Context types and discovery of ``cases_*.py``
  timing.py        the wall-clock timer (warm-up, perf_counter samples, median)
  roofline.py      this machine's copy / read / write memory bandwidth
  contention.py    other processes' CPU use while we measure (the machine is shared)
  machine.py       machine and software description for the JSON
  runner.py        runs one case: times every impl, errors vs reference, GB/s, speedups
  roles.py         which impls are ours, our own variants, peers or roofline reads
  quiet.py         keeps a case's own prints and warnings out of the table
  shapes.py        --shape: a case family at the user's sizes
  results.py       the timestamped JSON result files (read and write)
  report.py        the stdout table
  targets.py       the issues' targets as data, matched to case rows
  markdown.py      BENCHMARKS.md from result files
  compare.py       two result files side by side
  plot.py          roofline / speedup PNGs (matplotlib, optional)
  pytest_support.py  the same cases as pytest-benchmark tests
  cases_<family>.py  one module per kernel family, each with a ``CASES`` list
  __main__.py      the command line
"""
