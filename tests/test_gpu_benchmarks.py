"""``elmtune eval --tasks`` on a CUDA GPU (gpu-marked: scripts/gpu-check.sh runs tests/**/test_gpu*.py)."""

from __future__ import annotations

import json

import pytest
import torch

from elmtune.cli import main
from tests.test_benchmarks import trained, write_task  # noqa: F401  (trained: the module's fixture)


@pytest.mark.gpu  # not yet run on a GPU (none was available when it was written)
def test_eval_tasks_on_the_gpu_in_its_native_dtype(trained, tmp_path):
    """``--device auto --dtype auto`` on a CUDA machine: lm-eval's requests run on the GPU in bf16 (fp16 on older
    GPUs), and the adapter still solves the task as on the CPU."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'elmtune[lm-eval]')")
    from elmtune.benchmarks import elmtune_lm
    from elmtune.inference import load_pipeline

    _, adapter = trained
    lm = elmtune_lm(load_pipeline(adapter=str(adapter)), batch_size=4)
    assert lm.device.type == "cuda" and next(lm.model.parameters()).dtype in (torch.bfloat16, torch.float16)
    task = write_task(tmp_path / "task")
    out = tmp_path / "eval"
    assert main(["eval", "-a", str(adapter), "--tasks", "say_hello", "--include-path", str(task), "-o",
                 str(out)]) == 0
    row = json.loads((out / "eval.json").read_text())["benchmarks"]["results"]["say_hello"]
    assert row["adapter_model"]["acc"] >= 0.75 and row["adapter_model"]["acc"] >= row["base"]["acc"] + 0.5, row
