"""elmtune: fine-tune Apple's OpenELM models with LoRA, and run what comes out of it.

The Python API mirrors the command line::

    import elmtune
    elmtune.train(elmtune.TrainOptions(model=..., tokenizer=..., data=[...], output_dir="runs/a"))
    pipe = elmtune.load_pipeline(adapter="runs/a")
    elmtune.generate(pipe, ["Give three tips for staying healthy."])
    elmtune.complete(pipe, [pipe.chat_prompt([{"role": "user", "content": "Hi"}])])  # the adapter's chat template
    elmtune.merge("runs/a", "merged/"); elmtune.export_gguf("merged/", "model.gguf", "q8_0")
"""

import os

# Before torch is first imported: PyTorch then gives CPU tensors of 2 MB and more their own huge-page mappings,
# which go back to the OS when the tensor is freed.  Training allocates tensors of ever-changing sizes (packed
# rows); in glibc's heap they fragment it, and the process held up to ~1 GB of freed memory on the 270M bench.
# oneDNN (bf16 matmuls on CPU) caches a primitive per matmul shape, by default 1,024 of them; packed rows change
# length every micro-batch, so the cache kept growing (~0.3 GB on the 270M bench).  256 holds what one
# micro-batch reuses (measured: no slowdown).  Both only take effect when elmtune is imported before torch (as by
# the `elmtune` command); set the variables yourself to override.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")

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
