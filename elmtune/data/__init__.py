"""Instruction data: reading records, templates, encoding into supervised examples, inspection."""

from .encode import IGNORE_INDEX, DataSpec, EncodeStats, Example, load_examples
from .records import DataError, Record, read_records
from .templates import FIELD_PRESETS, TEMPLATES, Fields, Template

__all__ = ["IGNORE_INDEX", "DataSpec", "EncodeStats", "Example", "load_examples", "DataError", "Record",
           "read_records", "FIELD_PRESETS", "TEMPLATES", "Fields", "Template"]
