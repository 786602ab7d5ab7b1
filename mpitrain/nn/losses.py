"""Losses: softmax cross-entropy (from logits) and mean squared error.

``forward`` returns the mean loss as a Python float and caches what
``backward`` needs; ``backward`` returns d(loss)/d(input). ``forward_value``
is ``forward`` returning a 0-d array where the logits are: on a GPU the
training loop sums those on the device, so a step reads no scalar back.
"""

from __future__ import annotations

from typing import Any

from mpitrain.backend import array_module_of


class SoftmaxCrossEntropy:
    """Mean over the batch of -log softmax(logits)[label], computed stably (log-sum-exp)."""

    def forward(self, logits: Any, labels: Any) -> float:
        """Loss for logits (batch, classes) and integer labels (batch,) in [0, classes)."""
        return float(self.forward_value(logits, labels))

    def forward_value(self, logits: Any, labels: Any) -> Any:
        """``forward``'s loss as a 0-d array of the logits' module (no copy to the host)."""
        if logits.ndim != 2 or labels.shape != (logits.shape[0],):
            raise ValueError(
                f"expected logits (batch, classes) and labels (batch,), got {logits.shape} and {labels.shape}"
            )
        xp = array_module_of(logits)
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = xp.exp(shifted)
        total = exp.sum(axis=1)
        self._probs = exp / total[:, None]
        self._labels = labels
        log_likelihood = shifted[xp.arange(len(labels)), labels] - xp.log(total)
        return -log_likelihood.mean()

    def backward(self) -> Any:
        """d(loss)/d(logits) = (softmax - onehot) / batch."""
        xp = array_module_of(self._probs)
        grad = self._probs.copy()
        grad[xp.arange(len(self._labels)), self._labels] -= 1
        grad /= grad.shape[0]
        return grad


class MSELoss:
    """Mean over all elements of (prediction - target)^2."""

    def forward(self, prediction: Any, target: Any) -> float:
        """Loss for two arrays of the same shape."""
        return float(self.forward_value(prediction, target))

    def forward_value(self, prediction: Any, target: Any) -> Any:
        """``forward``'s loss as a 0-d array (no copy to the host)."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
        self._diff = prediction - target
        return (self._diff * self._diff).mean()

    def backward(self) -> Any:
        """d(loss)/d(prediction) = 2 (prediction - target) / size."""
        return self._diff * (2.0 / self._diff.size)
