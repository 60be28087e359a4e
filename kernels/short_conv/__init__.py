from .conv import causal_conv1d_step, causal_conv1d_varlen, causal_conv1d_varlen_split, naive_causal_conv1d

__all__ = ["causal_conv1d_varlen", "causal_conv1d_varlen_split", "causal_conv1d_step", "naive_causal_conv1d"]
