"""Fused operations with a Metal kernel where Metal is available and an mx.compile path elsewhere."""

from .xielu import xielu

__all__ = ["xielu"]
