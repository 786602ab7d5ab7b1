"""Neural-network core on numpy or cupy. Knows nothing of MPI."""

from mpitrain.nn.conv import Conv2d, MaxPool2d
from mpitrain.nn.layers import Dropout, Flatten, Linear, MaskStream, ReLU, Sigmoid, Tanh
from mpitrain.nn.losses import MSELoss, SoftmaxCrossEntropy
from mpitrain.nn.models import MODELS, build_model
from mpitrain.nn.module import Module, Parameter, Sequential

__all__ = [
    "MODELS",
    "Conv2d",
    "Dropout",
    "Flatten",
    "Linear",
    "MSELoss",
    "MaskStream",
    "MaxPool2d",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "SoftmaxCrossEntropy",
    "Tanh",
    "build_model",
]
