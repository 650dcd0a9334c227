"""Post-hoc methods, registered by name: fitted on a trained network's val cache, they score any
cache. Adding one: a file in this package with a ``PosthocMethod`` subclass and ``@register_posthoc``.
"""

from ..registry import Registry
from .base import PosthocMethod

POSTHOC = Registry("post-hoc method", __name__)
register_posthoc = POSTHOC.register

__all__ = ["POSTHOC", "PosthocMethod", "register_posthoc"]
