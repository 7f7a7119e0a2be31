"""The exported model directory: a Hugging Face model dir plus ``rewardforge.json``.

``model_dir`` is the one place that knows the directory's files (writing and reading them); ``card``
writes its model card; ``hf_import`` turns another toolkit's Hugging Face reward model into one.
"""

from rewardforge.export.model_dir import METADATA_FILE, PROMPTS_FILE, write_model_dir

__all__ = ["METADATA_FILE", "PROMPTS_FILE", "write_model_dir"]
