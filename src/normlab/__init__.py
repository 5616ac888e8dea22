"""normlab: Batch Normalization, or not?

Measure what BatchNorm does on your model, data and batch size, and train the alternatives
(GroupNorm/LayerNorm, normalizer-free networks, SkipInit) side by side.
"""

__version__ = "0.1.0"
