"""Models by name, for the command line: ``mlp`` and ``cnn``."""

from __future__ import annotations

from collections.abc import Sequence

from mpitrain.nn.conv import Conv2d, MaxPool2d
from mpitrain.nn.layers import Dropout, Flatten, Linear, ReLU
from mpitrain.nn.module import Sequential

MODELS = ("mlp", "cnn")


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (),
    dropout: float = 0.0,
    dropout_seed: int = 0,
) -> Sequential:
    """Build an uninitialised model (call ``init_params`` next).

    Args:
        name: "mlp" (Flatten, then Linear+ReLU per hidden size, then Linear) or
            "cnn" (two blocks of 3x3 conv, 2x2 max-pool and ReLU, with 16 and
            32 channels, then Linear+ReLU per hidden size, then Linear).
        input_shape: shape of one sample, e.g. (64,) or (1, 28, 28).
        num_classes: number of outputs.
        hidden: sizes of the hidden dense layers; empty means the default
            (128, 64) for mlp and (64,) for cnn.
        dropout: probability of a Dropout after each hidden dense layer (0: none).
        dropout_seed: seed of the first Dropout's masks (the next ones use +1, +2, ...);
            give every rank its own for independent masks.

    Raises:
        ValueError: unknown name, non-positive sizes, or a cnn on input that is
            not (channels, height, width) with height and width at least 4.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden sizes must be positive, got {list(hidden)}")
    if name == "mlp":
        hidden = tuple(hidden) or (128, 64)
        layers: list = [Flatten()]
        width = 1
        for dim in input_shape:
            width *= int(dim)
    else:
        hidden = tuple(hidden) or (64,)
        if len(input_shape) != 3 or min(input_shape[1:]) < 4:
            raise ValueError(f"cnn needs images shaped (channels, height>=4, width>=4), got {tuple(input_shape)}")
        channels, height, width_px = (int(d) for d in input_shape)
        # Pooling before ReLU is the same function with the same gradients (ReLU is monotonic),
        # and the ReLU then works on a quarter of the values.
        layers = [
            Conv2d(channels, 16, 3, padding=1),
            MaxPool2d(2),
            ReLU(),
            Conv2d(16, 32, 3, padding=1),
            MaxPool2d(2),
            ReLU(),
            Flatten(),
        ]
        width = 32 * (height // 4) * (width_px // 4)
    for index, size in enumerate(hidden):
        layers += [Linear(width, size), ReLU()]
        if dropout:
            layers.append(Dropout(dropout, seed=dropout_seed + index))
        width = size
    layers.append(Linear(width, num_classes, init="glorot"))
    return Sequential(*layers)
