"""route: GRPO post-training with gradient routing into an ablatable quarantine."""

from route.utils.kernels import configure_kernels as _configure_kernels
from route.utils.moved import install as _install_moved
from route.utils.threads import configure_threads as _configure_threads

__version__ = "0.1.0"

_configure_threads()  # chosen, not inherited: $ROUTE_THREADS, else $OMP_NUM_THREADS, else 1 (see route.utils.threads)
_configure_kernels()  # the same bits on any x86-64 CPU with AVX2: $ROUTE_KERNELS, else portable (route.utils.kernels)
_install_moved()  # the flat layout's module names answer with their new place (route.utils.moved)
