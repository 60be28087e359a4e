"""Parallel layouts: what a world of ranks is split into (layout.py), its process groups
(topology.py), the communications as autograd functions (mappings.py), the tensor-parallel layers
and loss (tensor_parallel.py), how each parameter is placed (plan.py) and the function that applies
a layout to a plain model (parallelize.py). docs/parallel.md describes them.

Only the torch-free pieces are imported here (megamom.config imports the layout checks); import the
others from their modules."""
from .layout import ParallelLayout, check_config, check_supported
from .plan import Placement, placement, sharding_plan

__all__ = ["ParallelLayout", "check_config", "check_supported", "Placement", "placement", "sharding_plan"]
