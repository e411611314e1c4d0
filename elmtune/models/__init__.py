"""Models elmtune implements natively (today: OpenELM), registered with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_openelm import PRESETS, OpenELMConfig
from .openelm import OpenELMForCausalLM, OpenELMModel


def register() -> None:
    """Make ``model_type: "openelm"`` resolve to our classes, so ``AutoModelForCausalLM.from_pretrained(dir)``
    needs no ``trust_remote_code`` even when the config still carries Apple's ``auto_map``."""
    AutoConfig.register("openelm", OpenELMConfig, exist_ok=True)
    AutoModel.register(OpenELMConfig, OpenELMModel, exist_ok=True)
    AutoModelForCausalLM.register(OpenELMConfig, OpenELMForCausalLM, exist_ok=True)


__all__ = ["PRESETS", "OpenELMConfig", "OpenELMForCausalLM", "OpenELMModel", "register"]
