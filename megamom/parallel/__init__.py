"""Parallel layouts: what a world of ranks is split into (layout.py) and how each parameter is
placed over it (plan.py). Nothing here communicates yet; the process groups and the parallel
layers build on these two."""
from .layout import ParallelLayout, check_config, check_supported
from .plan import Placement, placement, sharding_plan

__all__ = ["ParallelLayout", "check_config", "check_supported", "Placement", "placement", "sharding_plan"]
