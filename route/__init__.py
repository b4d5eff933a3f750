"""route: GRPO post-training with gradient routing into an ablatable quarantine."""

from route.kernels import configure_kernels as _configure_kernels
from route.threads import configure_threads as _configure_threads

__version__ = "0.1.0"

_configure_threads()  # chosen, not inherited: $ROUTE_THREADS, else $OMP_NUM_THREADS, else 1 (see route.threads)
_configure_kernels()  # the same bits on any x86-64 CPU with AVX2: $ROUTE_KERNELS, else portable (route.kernels)
