"""Fused operations: a Metal kernel where Metal is available, an mx.compile path elsewhere."""

from .xielu import xielu, xielu_backend

__all__ = ["xielu", "xielu_backend"]
