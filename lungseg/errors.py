"""The package's one exception root.

Every error lungseg raises on purpose derives from :class:`LungsegError`, so a caller can catch
"anything lungseg refused" in one clause. Each subclass also keeps the built-in base it had
before (``ValueError``, ``OSError``, ...), so existing ``except ValueError`` callers still work.
"""

from __future__ import annotations


class LungsegError(Exception):
    """Root of every exception lungseg raises deliberately."""
