"""Prompt templates and field mappings: how a record becomes a prompt and an answer.

The template name and field mapping are saved with every adapter (``elmtune.json``), so inference renders
prompts exactly as training did.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass

from .records import DataError, Record

#: Field presets: which record keys hold the instruction, the optional input and the answer.
FIELD_PRESETS: dict[str, dict[str, str]] = {
    "en": {"instruction": "en_instruction", "input": "en_input", "output": "en_output"},  # the tutorial's choice
    "zh": {"instruction": "instruction", "input": "input", "output": "output"},
}

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

#: Named templates.  Anything else containing "{instruction}" is taken as a format string.
TEMPLATES: dict[str, str] = {
    "openelm-sep": "{instruction}{input}<sep>",  # the tutorial's prompt, verbatim
    "alpaca": ALPACA_WITH_INPUT,
}


@dataclass(frozen=True)
class Fields:
    instruction: str
    input: str | None
    output: str

    @classmethod
    def parse(cls, spec: str) -> "Fields":
        """``en`` / ``zh``, or ``instruction=KEY,input=KEY,output=KEY`` (input optional)."""
        if spec in FIELD_PRESETS:
            return cls(**FIELD_PRESETS[spec])
        mapping = {}
        for part in spec.split(","):
            name, sep, key = part.partition("=")
            if not sep or name.strip() not in ("instruction", "input", "output") or not key.strip():
                raise ValueError(f"--fields {spec!r}: use a preset ({', '.join(FIELD_PRESETS)}) or "
                                 "instruction=KEY,input=KEY,output=KEY (input optional)")
            mapping[name.strip()] = key.strip()
        if "instruction" not in mapping or "output" not in mapping:
            raise ValueError(f"--fields {spec!r}: instruction=KEY and output=KEY are required")
        return cls(mapping["instruction"], mapping.get("input"), mapping["output"])

    def extract(self, record: Record, with_output: bool = True) -> tuple[str, str, str]:
        """(instruction, input, output) of a record; a missing or non-string field is a DataError.
        ``with_output=False`` reads prompts only (the output comes back empty)."""
        values = []
        output_key = self.output if with_output else None
        for role, key in (("instruction", self.instruction), ("input", self.input), ("output", output_key)):
            if key is None:
                values.append("")
                continue
            if key not in record.values:
                raise DataError(f"{record.where}: missing field {key!r} (the {role}; the record has: "
                                f"{', '.join(map(str, record.values)) or 'no fields'})")
            value = record.values[key]
            if value is None and role == "input":
                value = ""  # a null input means "no input"
            if not isinstance(value, str):
                raise DataError(f"{record.where}: field {key!r} must be a string, got {type(value).__name__}")
            values.append(value)
        return values[0], values[1], values[2]


@dataclass(frozen=True)
class Template:
    name: str
    format: str

    @classmethod
    def parse(cls, spec: str) -> "Template":
        if spec in TEMPLATES:
            return cls(spec, TEMPLATES[spec])
        if "{instruction}" not in spec:
            raise ValueError(f"--template {spec!r}: use {', '.join(TEMPLATES)}, or a format string containing "
                             "{instruction} (and optionally {input})")
        names = {name for _, name, _, _ in string.Formatter().parse(spec) if name is not None}
        if names - {"instruction", "input"}:
            raise ValueError(f"--template {spec!r}: only {{instruction}} and {{input}} may be used, "
                             f"found {', '.join(sorted(names - {'instruction', 'input'}))}")
        return cls("custom", spec)

    def prompt(self, instruction: str, input: str = "") -> str:
        if self.name == "alpaca" and not input:
            return ALPACA_NO_INPUT.format(instruction=instruction)
        return self.format.format(instruction=instruction, input=input)

    def to_dict(self) -> dict:
        return asdict(self)
