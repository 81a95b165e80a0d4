"""expertpool: Pool of Experts (Kim & Choi, SIGMOD 2021) as a package, a CLI and a service.

From one big classifier (the oracle), extract once a small shared library and one tiny expert per
primitive task; then answer any composite task in milliseconds, with no training, by consolidating the
library and the chosen experts.
"""

__version__ = "0.1.0"

from .pool import Pool, open_pool  # noqa: E402

__all__ = ["Pool", "open_pool", "__version__"]
