"""Checkpoint conversion to and from Hugging Face format (`megamom convert`, docs/convert.md).

    megamom.convert.to_hf.to_hf(checkpoint, out, fmt="megamom" | "fla", dtype="fp32" | "bf16")
    megamom.convert.to_hf.write_export(dir, model_config, state_dict, ...)   (weights in memory)
    megamom.convert.from_hf.from_hf(model_dir, out)

Checkpoints are read in one place, megamom.convert.source (through
megamom.train.checkpoint.load_model_state_dict)."""
from .errors import ConvertError

__all__ = ["ConvertError"]
