"""Property-based fuzzing of the server against its own OpenAPI document (schemathesis, every check)."""

from __future__ import annotations

import pytest

import shutil
import subprocess
import sys
from pathlib import Path


@pytest.mark.slow  # ~35 s of fuzzing (CI runs it)
def test_openapi_fuzzing_finds_no_server_error_or_schema_violation(server, tmp_path):
    st = shutil.which("st") or str(Path(sys.executable).with_name("st"))
    result = subprocess.run(
        [st, "run", f"{server.url}/openapi.json", "--checks", "all", "--max-examples", "60", "--seed", "7",
         "--request-timeout", "30", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    assert " passed" in summary and "failed" not in summary.split("SUMMARY")[-1]
