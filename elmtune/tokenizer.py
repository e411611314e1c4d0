"""Tokenizers for training and inference.

Training data is encoded with the SentencePiece model itself when the tokenizer has one (``tokenizer.model``,
as Llama-2's does): that is what the tutorial's fast tokenizer produced under transformers 4.x, while
transformers 5's Llama tokenizer splits runs of spaces differently (24 of the tutorial's 1,007 golden records).
The transformers tokenizer is kept alongside for decoding and saving.  Llama-2 has no pad token: pad = eos,
as in the tutorial.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .hub import local_dir

TOKENIZER_FILES = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


@dataclass
class Tokenizer:
    hf: PreTrainedTokenizerBase
    directory: Path
    sentencepiece: object | None = None  # sentencepiece.SentencePieceProcessor when tokenizer.model exists

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.hf.pad_token_id

    def encode(self, texts: list[str], special_as_text: bool = False) -> list[list[int]]:
        """Token ids of each text, without special tokens (batched in C++ when SentencePiece is used).
        ``special_as_text``: a special token's string in the text (``</s>``) stays text, as SentencePiece always
        keeps it; by default the transformers tokenizer turns it into the token."""
        if self.sentencepiece is not None:
            return self.sentencepiece.encode(texts)
        if special_as_text:
            return self.hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def encode_continuation(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text as it would be tokenized right after other text: without the word start a
        SentencePiece tokenizer puts at the start of a string (" Paris" → ▁Paris, not ▁ ▁Paris), so that the ids
        of a prompt and of its continuation decode, together, to the two texts joined.  Encoded after a newline,
        which is then removed (transformers' own trick for chat pieces); special-token strings stay text."""
        newline = self.encode(["\n"], special_as_text=True)[0]
        out = []
        for text, ids in zip(texts, self.encode(["\n" + t for t in texts], special_as_text=True)):
            out.append(ids[len(newline):] if ids[:len(newline)] == newline else self.encode([text], True)[0])
        return out

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        """Copy the tokenizer's own files, so a trained adapter carries the exact tokenizer it was trained with."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            source = self.directory / name
            if source.is_file():
                (directory / name).write_bytes(source.read_bytes())


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from a directory or hub id, with pad = eos when it has no pad token."""
    directory = local_dir(spec, "tokenizer", allow_patterns=["*.model", "*.json", "*.txt"])
    if not any((directory / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise ValueError(f"tokenizer {spec!r}: {directory} holds no tokenizer.model or tokenizer.json")
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    hf = AutoTokenizer.from_pretrained(directory)
    if hf.pad_token is None:
        hf.pad_token = hf.eos_token
    processor = None
    if (directory / "tokenizer.model").is_file():
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    return Tokenizer(hf=hf, directory=directory, sentencepiece=processor)
