"""Importance criteria, registered by name. Each scores the units of one layer: query heads, KV groups and MLP
channels (higher = more important); expert criteria score the routed experts of mixture-of-experts layers.
Allocation decides how many of each to keep."""

from __future__ import annotations

from . import cfsp, depth, experts, flap, gradient, magnitude, obs, wanda_sp  # noqa: F401  (registration)
from .base import CRITERIA, Criterion, LayerScores, get_criterion, register

__all__ = ["CRITERIA", "Criterion", "LayerScores", "get_criterion", "register"]
