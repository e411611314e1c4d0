"""Turn a ``--model`` / ``--tokenizer`` value into a local directory: a path as is, a hub id downloaded.

``org/name`` is a Hugging Face Hub id; ``modelscope:org/name`` a ModelScope id (needs the ``modelscope``
package).  Offline, or when the hub refuses, the error says how to fetch the files by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"^(modelscope:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(ValueError):
    """A model or tokenizer could neither be found locally nor downloaded."""


def is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def local_dir(spec: str, what: str, allow_patterns: list[str] | None = None) -> Path:
    """``spec`` as a local directory, downloading a hub id into the hub's cache first."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HubError(f"{what} {spec!r}: is a file; expected a directory")
    if not is_hub_id(spec):
        raise HubError(f"{what} {spec!r}: no such directory (and not a hub id like 'apple/OpenELM-270M')")
    if spec.startswith("modelscope:"):
        return _modelscope(spec.removeprefix("modelscope:"), what, allow_patterns)
    return _huggingface(spec, what, allow_patterns)


def _huggingface(repo: str, what: str, allow_patterns: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=allow_patterns))
    except Exception as error:  # offline, unknown repo, gated repo, …: all end the same way for the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HubError(
            f"{what} {repo!r}: could not download from the Hugging Face Hub ({reason}). Without network, "
            f"download it elsewhere with `hf download {repo} --local-dir DIR`, copy DIR here and pass its path"
        ) from None


def _modelscope(repo: str, what: str, allow_patterns: list[str] | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise HubError(f"{what} 'modelscope:{repo}': the `modelscope` package is not installed "
                       "(pip install modelscope), or download the files yourself and pass their directory") from None
    try:
        return Path(snapshot_download(repo, allow_patterns=allow_patterns))
    except Exception as error:
        raise HubError(f"{what} 'modelscope:{repo}': could not download from ModelScope ({error}). Without "
                       f"network, run `modelscope download --model {repo} --local_dir DIR` elsewhere and pass DIR") from None
