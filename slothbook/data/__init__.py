"""Datasets, chat templates, response-only masks and packing (floor 2: imports only errors and kernels below)."""

from .collators import PackedCollator, PaddingCollator
from .demo import demo_dataset_path
from .files import load_dataset_file
from .formats import SHAPES, detect_shape, standardize
from .lengths import check_lengths
from .markers import TurnMarkers, assistant_spans, detect_turn_markers
from .packing import pack, packed_attention_mask
from .responses import tokenize_responses, train_on_responses_only
from .templates import TEMPLATES, template_spec
from .tokenizer import get_chat_template, heal_tokenizer

__all__ = [
    "PackedCollator", "PaddingCollator", "SHAPES", "TEMPLATES", "TurnMarkers", "assistant_spans", "check_lengths",
    "demo_dataset_path", "detect_shape", "detect_turn_markers", "get_chat_template", "heal_tokenizer",
    "load_dataset_file", "pack", "packed_attention_mask", "standardize", "template_spec", "tokenize_responses",
    "train_on_responses_only",
]
