"""The model families rewardforge's exact speed paths know, the one list each kernel reads.

Other families train and score the same way through transformers' own code, only without these paths.
"""

# Encoders whose sequence-classification head reads only the first token of the last hidden state.
ENCODERS = ("bert", "roberta", "xlm-roberta", "electra")
# Decoders with Llama's layer structure (q/k/v/o projections, input and post-attention norms, MLP).
DECODERS = ("llama", "mistral", "qwen2", "qwen3")
# ``config.model_type`` values with a known family: ``rf_eager`` attention (models.attention) and the
# sparse last layer (models.lastlayer) are installed for them.
KNOWN = ENCODERS + DECODERS
# Attention implementations that take a custom attention mask tensor, as the sparse last layer and
# shared-prompt packing (data.packing) pass one.
MASK_KERNELS = ("eager", "sdpa", "rf_eager")
