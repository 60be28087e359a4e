from .chunk import chunk_gla_torch
from .naive import gla_step, naive_recurrent_gla

__all__ = ["chunk_gla_torch", "naive_recurrent_gla", "gla_step"]
