"""CRADLE's distances (Pham, Lutellier, Qi, Tan, ICSE 2019, section III; science.md section 6).

Output distances, per input i (one row of the batch):

- MAD-based: ``delta(O, G) = mean|O - G|`` against a ground truth G and
  ``D_MAD = |delta(O1, G) - delta(O2, G)| / (delta(O1, G) + delta(O2, G))``, in [0, 1].
- class-based (classifiers): r = rank (1-based) of the true label among a backend's top-k classes,
  ``score = 2^(k - r)`` inside the top-k and 0 outside; ``D_CLASS = |score_1 - score_2|``.

A backend pair is inconsistent when more than a fraction p of the inputs exceed the threshold.

Per layer (localization): ``delta_L = mean|L_1 - L_2|`` between the two backends' outputs of layer L and the
inconsistency-introduction rate ``R_L = (delta_L - delta_pre) / (delta_pre + eps)``, delta_pre the largest
delta_L of L's inputs (0 for the model input); the inconsistent layer with the highest R_L introduced it.

NOTE on D_MAD at the noise floor: the formula is 0/0 when both backends equal G, and it is scale-free, so
two float32 backends that both sit at rounding distance (~1e-7) from a float64 oracle can score D_MAD = 0.5
on rounding noise alone. CRADLE compared against one-hot labels, where delta is O(0.1) and this never
arises. normlab therefore sets ``D_MAD = 0`` whenever both deltas are within ``floor`` of G (the pair agrees
with the ground truth to the stated tolerance); above the floor the paper's formula applies unchanged.
"""

from __future__ import annotations

import numpy as np

from normlab.errors import NormlabError


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)


def _same_shape(**arrays: np.ndarray) -> None:
    shapes = {name: tuple(np.shape(a)) for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        given = ", ".join(f"{name}{list(s)}" for name, s in shapes.items())
        raise NormlabError(f"mismatched shapes: {given}; all outputs must have the same shape")


def mad_delta(output: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``delta(O, G) = mean|O - G|`` per input (over all but the first axis), shape (N,)."""
    _same_shape(output=output, truth=truth)
    return np.abs(_rows(output) - _rows(truth)).mean(axis=1)


def d_mad(o1: np.ndarray, o2: np.ndarray, truth: np.ndarray, *, floor: float = 0.0) -> np.ndarray:
    """CRADLE's MAD-based distance per input, shape (N,), in [0, 1].

    ``floor`` >= 0: when ``delta(O1, G) <= floor`` and ``delta(O2, G) <= floor`` the distance is 0 (both
    agree with G to tolerance; the formula is undefined or pure rounding noise there; see module docstring).
    """
    _same_shape(o1=o1, o2=o2, truth=truth)
    if not floor >= 0:
        raise NormlabError(f"floor must be >= 0, got {floor!r}")
    d1, d2 = mad_delta(o1, truth), mad_delta(o2, truth)
    total = d1 + d2
    both_at_truth = (d1 <= floor) & (d2 <= floor)
    safe = np.where(total > 0, total, 1.0)
    return np.where(both_at_truth | (total == 0), 0.0, np.abs(d1 - d2) / safe)


def class_score(logits: np.ndarray, labels: np.ndarray, *, k: int = 5) -> np.ndarray:
    """CRADLE's top-k score per input: ``2^(k - r)`` with r the 1-based rank of the label, 0 outside top-k.

    ``logits`` (N, num_classes), ``labels`` (N,) ints. Ties rank by class index (stable sort).
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise NormlabError(
            f"class_score needs logits (N, classes) and labels (N,), got {list(logits.shape)} and "
            f"{list(labels.shape)}"
        )
    if not isinstance(k, int) or k < 1:
        raise NormlabError(f"k must be a positive int, got {k!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise NormlabError(
            f"labels must be in [0, {logits.shape[1] - 1}], got {labels.min()}..{labels.max()}"
        )
    order = np.argsort(-logits, axis=1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=1) + 1
    return np.where(rank <= k, 2.0 ** (k - rank), 0.0)


def d_class(logits1: np.ndarray, logits2: np.ndarray, labels: np.ndarray, *, k: int = 5) -> np.ndarray:
    """CRADLE's class-based distance per input: ``|score_1 - score_2|``, shape (N,)."""
    _same_shape(logits1=logits1, logits2=logits2)
    return np.abs(class_score(logits1, labels, k=k) - class_score(logits2, labels, k=k))


def inconsistent(distances: np.ndarray, threshold: float, p: float) -> bool:
    """CRADLE's verdict: more than a fraction ``p`` of inputs have distance above ``threshold``."""
    if not 0.0 <= p < 1.0:
        raise NormlabError(f"p must be in [0, 1), got {p!r}")
    distances = np.asarray(distances)
    return bool(distances.size) and float(np.mean(distances > threshold)) > p


def layer_delta(l1: np.ndarray, l2: np.ndarray) -> float:
    """``delta_L = mean|L_1 - L_2|`` over all elements of one layer's output."""
    _same_shape(l1=l1, l2=l2)
    return float(np.abs(np.asarray(l1, np.float64) - np.asarray(l2, np.float64)).mean())


def introduction_rate(delta: float, delta_pre: float, *, eps: float = 1e-7) -> float:
    """``R_L = (delta_L - delta_pre) / (delta_pre + eps)``; eps keeps the model input's layer finite."""
    return (delta - delta_pre) / (delta_pre + eps)
