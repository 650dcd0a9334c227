"""Training methods, registered by name.

Adding a method: one file in this package defining a ``TrainingMethod`` subclass decorated with
``@register_method``; see ``standard.py`` for the smallest example and README "Adding a method".
"""

from ..registry import Registry
from .base import TrainContext, TrainingMethod

METHODS = Registry("training method", __name__)
register_method = METHODS.register

__all__ = ["METHODS", "TrainContext", "TrainingMethod", "register_method"]
