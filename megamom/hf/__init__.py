"""Hugging Face classes for megamom models (shipped inside `megamom`-format exports as remote
code, see megamom.hf.bundle) and their registration with transformers' Auto classes."""
from __future__ import annotations


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM resolve model_type "megamom" to the installed classes
    (no remote code needed when megamom is installed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_megamom import MegaMoMConfig
    from .modeling_megamom import MegaMoMForCausalLM

    try:
        AutoConfig.register("megamom", MegaMoMConfig)
        AutoModelForCausalLM.register(MegaMoMConfig, MegaMoMForCausalLM)
    except ValueError:  # already registered
        pass


def __getattr__(name):  # transformers is imported only when these are used
    if name in ("MegaMoMConfig",):
        from .configuration_megamom import MegaMoMConfig
        return MegaMoMConfig
    if name in ("MegaMoMForCausalLM", "MegaMoMCache", "MegaMoMPreTrainedModel"):
        from . import modeling_megamom
        return getattr(modeling_megamom, name)
    raise AttributeError(name)


__all__ = ["register", "MegaMoMConfig", "MegaMoMForCausalLM", "MegaMoMCache", "MegaMoMPreTrainedModel"]
