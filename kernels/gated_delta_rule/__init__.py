from .chunk import chunk_gated_delta_rule_torch
from .naive import gated_delta_rule_step, naive_recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule_torch", "naive_recurrent_gated_delta_rule", "gated_delta_rule_step"]
