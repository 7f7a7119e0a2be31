"""Data preparation: read rows, parse formats, render templates, tokenize with truncation, batch.

The stages, in the order data flows: ``readers`` -> ``formats`` -> ``template`` -> ``tokenize`` ->
``datasets`` -> ``batching`` (and ``packing`` for shared-prompt pairs); ``inputs`` is the one path
from any scored item to input ids. The names below load lazily, so ``rewardforge.data.formats`` and
``rewardforge.data.template`` import without torch (the config validates against their choice lists).
"""

import importlib

_EXPORTS = {
    "batching": ["BatchSampler", "PairCollator", "RatedCollator", "pad_sequences"],
    "datasets": ["DataReport", "PairDataset", "RatedDataset", "build_dataset", "split_by_prompt"],
    "formats": ["FORMATS", "PreferencePair", "RatedResponse", "detect_format", "parse_rows"],
    "readers": ["DataError", "Row", "read_rows"],
    "template": ["PLAIN_TEMPLATE", "TextRenderer", "setup_template"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"rewardforge.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'rewardforge.data' has no attribute {name!r}")
