"""elmtune: fine-tune Apple's OpenELM models with LoRA, and run what comes out of it.

The Python API mirrors the command line::

    import elmtune
    elmtune.train(elmtune.TrainOptions(model=..., tokenizer=..., data=[...], output_dir="runs/a"))
    pipe = elmtune.load_pipeline(adapter="runs/a")
    elmtune.generate(pipe, ["Give three tips for staying healthy."])
    elmtune.merge("runs/a", "merged/"); elmtune.export_gguf("merged/", "model.gguf", "q8_0")
"""

from .models import PRESETS, OpenELMConfig, OpenELMForCausalLM, OpenELMModel, register

__version__ = "0.1.0"

register()

from .demo import DemoOptions, run_demo  # noqa: E402
from .evaluate import run_eval  # noqa: E402
from .export_gguf import export_gguf  # noqa: E402
from .inference import Pipeline, SamplingOptions, complete, generate, load_pipeline  # noqa: E402
from .merge import merge  # noqa: E402
from .training import TrainOptions, train  # noqa: E402

__all__ = ["PRESETS", "OpenELMConfig", "OpenELMForCausalLM", "OpenELMModel", "__version__", "DemoOptions",
           "run_demo", "run_eval", "export_gguf", "Pipeline", "SamplingOptions", "complete", "generate",
           "load_pipeline", "merge", "TrainOptions", "train"]
