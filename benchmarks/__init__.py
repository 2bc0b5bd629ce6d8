"""Benchmarks: scripts that print their figures (run as ``python -m dmstream.benchmarks.<name>``).

Every benchmark measures one core: the BLAS/OpenMP pools are pinned to one
thread here, because this package is imported before any benchmark module
(and so before numpy).
"""

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"
