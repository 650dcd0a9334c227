"""Classification metrics on (N, C) class probabilities and (N,) integer labels.

Accuracies are fractions in [0, 1], not percentages.

ECE follows Calibrated-DNN's ``calculate_ECE`` (10 equal-width bins with edges 0.1, 0.2, ..., 0.9,
a confidence on an inner edge going to the bin above it), with one deviation: the reference builds
its bins with ``np.digitize`` over ``linspace(0.1, 1, 10)`` and loops over 10 bins only, so a
confidence of exactly 1.0 lands in an 11th bin that is never counted. Saturated softmaxes are common
on the training-like val split, so here the last bin is closed, [0.9, 1.0], and they count.
The bin count is a parameter: the reports use 15 (``eebench.bootstrap.ECE_BINS``), the usual
choice since Guo et al. (2017); 10 stays the default for Calibrated-DNN's own comparisons.
"""

from __future__ import annotations

import torch

ECE_BINS = 10


def log_loss(label_probs: torch.Tensor) -> torch.Tensor:
    """-log p(label) of each sample, in float64, from the label's probability (any shape); a zero
    probability is clamped to float64 tiny, so the loss stays finite."""
    return -label_probs.double().clamp_min(torch.finfo(torch.float64).tiny).log()


def label_probabilities(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(..., N) probability of each sample's label, from (..., N, C) probabilities and (N,) labels."""
    index = labels.long().view(*([1] * (probs.dim() - 2)), -1, 1).expand(*probs.shape[:-1], 1)
    return probs.gather(-1, index).squeeze(-1)


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels (``log_loss`` averaged)."""
    return float(log_loss(label_probabilities(probs, labels)).mean())


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the k most probable classes."""
    top = probs.topk(min(k, probs.shape[1]), dim=1).indices
    return float((top == labels.long().view(-1, 1)).any(dim=1).double().mean())


def top1(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return topk_accuracy(probs, labels, 1)


def top5(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return topk_accuracy(probs, labels, 5)


def ece_bin_index(confidences: torch.Tensor, n_bins: int = ECE_BINS) -> torch.Tensor:
    """Bin of each confidence: [0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1] (the last bin is closed)."""
    inner_edges = torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    return torch.bucketize(confidences.double(), inner_edges, right=True)


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the max-probability confidence, every sample counted."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels.long()).double()
    bins = ece_bin_index(conf, n_bins)
    size = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(correct))
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf.double())
    gap = (acc_sum - conf_sum).abs()  # = size * |mean acc - mean conf| for each bin
    return float(gap.sum() / size.sum())
