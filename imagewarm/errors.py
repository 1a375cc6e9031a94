"""The root of every error imagewarm raises on purpose.

`except ImagewarmError` catches them all (and nothing else: a bug stays a bug). Each error also keeps
the builtin it always had as a second base, as requests does (`class NotFound(KubeError,
LookupError)`), so callers that catch `ValueError`, `LookupError`, `ConnectionError`... still do.
"""

from __future__ import annotations


class ImagewarmError(Exception):
    """An error imagewarm raises on purpose; its message says what is wrong and what to do."""
