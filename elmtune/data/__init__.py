"""Training data: reading records in every format, templates, encoding into supervised examples, inspection."""

from .chat import ChatTemplate, RenderedPrompt, chat_template_for_adapter, render_prompt
from .encode import IGNORE_INDEX, TRAIN_ON, DataSpec, EncodeStats, Example, load_examples
from .formats import FORMATS
from .records import DataError, Record, read_records
from .templates import FIELD_PRESETS, TEMPLATES, Fields, Template

__all__ = ["IGNORE_INDEX", "TRAIN_ON", "DataSpec", "EncodeStats", "Example", "load_examples", "DataError", "Record",
           "read_records", "FIELD_PRESETS", "TEMPLATES", "Fields", "Template", "FORMATS", "ChatTemplate",
           "RenderedPrompt", "chat_template_for_adapter", "render_prompt"]
