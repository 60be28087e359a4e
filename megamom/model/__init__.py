"""Models in plain PyTorch; parallelism is applied from outside (megamom.parallel)."""
from .cache import AttentionLayerCache, MemoryLayerCache, ModelCache
from .lm import CausalLM, LMOutput
from .memory_mixer import MemoryMixer
from .router import RouterStats


def build_model(cfg) -> CausalLM:
    """cfg: ModelConfig (or a full Config)."""
    return CausalLM(getattr(cfg, "model", cfg))


__all__ = ["CausalLM", "LMOutput", "MemoryMixer", "RouterStats", "ModelCache", "MemoryLayerCache",
           "AttentionLayerCache", "build_model"]
