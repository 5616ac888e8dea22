"""Models by name (:func:`create_model`), each with a pluggable normalization or its normalizer-free variant.

VGG-A (Santurkar et al. 2018), MLP, deep linear network, the MNIST-1D CNN, pre-activation CIFAR ResNets
(and ``resnet20/56/110``), Wide ResNets and NF-ResNets. Residual models follow :mod:`normlab.models.blocks`.
"""

from normlab.models import cnn, dln, mlp, nf_resnet, resnet, vgg  # noqa: F401  (registers the models)
from normlab.models.blocks import ResidualBlock, ResidualModel
from normlab.models.factory import create_model, list_models, model_options, register_alias, register_model

__all__ = [
    "ResidualBlock",
    "ResidualModel",
    "create_model",
    "list_models",
    "model_options",
    "register_alias",
    "register_model",
]
