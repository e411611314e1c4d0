"""elmtune: fine-tune Apple's OpenELM models with LoRA, and run what comes out of it."""

from .models import PRESETS, OpenELMConfig, OpenELMForCausalLM, OpenELMModel, register

__version__ = "0.1.0"

register()

__all__ = ["PRESETS", "OpenELMConfig", "OpenELMForCausalLM", "OpenELMModel", "__version__"]
