"""The one evaluation protocol: budgeted batch (MSDNet) and anytime curves.

Budgeted batch, as the MSDNet reference (``adaptive_inference.py``) does it:

1. For p = 1..39, q = p/20 and pi_k = q^k / sum_j q^j (k = 1..K) is the share of samples meant to
   leave at exit k.
2. Thresholds on val: going through exits k = 1..K-1, n_k = floor(N * pi_k) (a share of the whole
   val set). T_k is the score of the n_k-th highest-scoring sample among those that have not left
   yet; every remaining sample with score >= T_k leaves. If n_k = 0 or fewer than n_k samples
   remain, T_k = +1e8 and nobody leaves. T_K = -1e8: the last exit takes the rest.
3. On test: a sample leaves at the first k with score_k >= T_k; accuracy is the mean correctness
   of the prediction at that exit, expected FLOPs = sum_k (share leaving at k) * F_k.

Everything is vectorised over budgets and samples; only the K-1 exits are a (short) Python loop.
Scores may carry a budget axis, (B, K, N), for methods that fit one scorer per budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NO_EXIT = 1e8
TAKE_ALL = -1e8
N_BUDGETS = 39


def geometric_exit_distributions(num_exits: int, n_budgets: int = N_BUDGETS) -> tuple[torch.Tensor, torch.Tensor]:
    """q = p/20 for p = 1..n_budgets and the matching (B, K) exit distributions pi_k ~ q^k."""
    q = torch.arange(1, n_budgets + 1, dtype=torch.float64) / 20
    powers = q[:, None] ** torch.arange(1, num_exits + 1, dtype=torch.float64)[None, :]
    return q, powers / powers.sum(dim=1, keepdim=True)


def exit_thresholds(val_scores: torch.Tensor, exit_distributions: torch.Tensor) -> torch.Tensor:
    """Per-budget, per-exit thresholds (B, K) from val scores (K, N) or (B, K, N).

    Scores shared by every budget, (K, N), are sorted once per exit; only the set of samples still
    remaining differs between budgets. In score order, the running count of remaining samples is
    non-decreasing, so the n_k-th remaining sample is found by a binary search of that count.
    (Ties: the n_k-th remaining score is the same value whichever tied sample comes first, so an
    unstable sort gives the same thresholds.) ``remaining`` is kept samples-first, (N, B), where
    reordering samples copies whole rows.
    """
    n_budgets, num_exits = exit_distributions.shape
    shared = val_scores.dim() == 2
    n = val_scores.shape[-1]
    counts = torch.floor(n * exit_distributions).to(torch.int32)  # (B, K)
    thresholds = torch.full((n_budgets, num_exits), NO_EXIT, dtype=val_scores.dtype)
    remaining = torch.ones(n, n_budgets, dtype=torch.bool)  # (N, B)
    for k in range(num_exits - 1):
        if shared:
            sorted_scores, order = val_scores[k].sort(descending=True)  # (N,)
            remaining_sorted = remaining.index_select(0, order).T  # (B, N)
        else:
            sorted_scores, order = val_scores[:, k, :].sort(dim=1, descending=True)  # (B, N)
            remaining_sorted = remaining.T.gather(1, order)
        rank = remaining_sorted.cumsum(1, dtype=torch.int32)  # rank among the remaining, in score order
        wanted = counts[:, k : k + 1].contiguous()
        found = (wanted[:, 0] > 0) & (rank[:, -1] >= wanted[:, 0])
        position = torch.searchsorted(rank, wanted).clamp_(max=n - 1)  # first place the rank reaches n_k
        value = sorted_scores.expand(n_budgets, -1).gather(1, position)[:, 0]
        thresholds[:, k] = torch.where(found, value, thresholds[:, k])
        score_k = val_scores[k][:, None] if shared else val_scores[:, k, :].T  # (N, 1 or B)
        remaining &= score_k < thresholds[:, k]
    thresholds[:, -1] = TAKE_ALL
    return thresholds


def exit_indices(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(B, N) index of the exit each sample leaves at: the first k with score_k >= T_k.

    Counted as the number of exits a sample passes (bool and int32 arithmetic, cheaper than
    selecting indices); the last exit takes whoever is left.
    """
    n_budgets, num_exits = thresholds.shape
    shared = scores.dim() == 2
    still_in = torch.ones(n_budgets, scores.shape[-1], dtype=torch.bool)
    passed = torch.zeros(n_budgets, scores.shape[-1], dtype=torch.int32)
    for k in range(num_exits - 1):
        score_k = scores[k][None, :] if shared else scores[:, k, :]
        still_in &= score_k < thresholds[:, k : k + 1]
        passed += still_in
    return passed.long()


@dataclass
class BudgetedCurve:
    q: np.ndarray  # (B,) nan where the distribution is not geometric
    thresholds: np.ndarray  # (B, K)
    exit_fractions: np.ndarray  # (B, K) on test
    flops: np.ndarray  # (B,) expected FLOPs per test sample
    accuracy: np.ndarray  # (B,) in percent
    exits: torch.Tensor | None = None  # (B, N_test) exit index each test sample leaves at

    def rows(self) -> list[dict]:
        out = []
        for b in range(len(self.flops)):
            row = {"budget_id": b + 1, "q": self.q[b], "flops": self.flops[b], "accuracy": self.accuracy[b]}
            row.update({f"exit_fraction_{k + 1}": f for k, f in enumerate(self.exit_fractions[b])})
            row.update({f"threshold_{k + 1}": t for k, t in enumerate(self.thresholds[b])})
            out.append(row)
        return out


def budgeted_curve(
    val_scores: torch.Tensor,
    test_scores: torch.Tensor,
    test_correct: torch.Tensor,
    flops: list[float] | torch.Tensor,
    exit_distributions: torch.Tensor | None = None,
) -> BudgetedCurve:
    """Calibrate thresholds on val, apply them to test.

    ``val_scores``/``test_scores``: (K, N) or (B, K, N); ``test_correct``: (K, N_test) bool, the
    correctness of each exit's prediction; ``flops``: cumulative FLOPs per exit (K,).
    """
    num_exits = test_correct.shape[0]
    if exit_distributions is None:
        q, exit_distributions = geometric_exit_distributions(num_exits)
    else:
        q = torch.full((exit_distributions.shape[0],), float("nan"), dtype=torch.float64)
    flops_t = torch.as_tensor(flops, dtype=torch.float64)
    if flops_t.shape != (num_exits,):
        raise ValueError(f"{len(flops_t)} FLOPs values for {num_exits} exits")
    thresholds = exit_thresholds(val_scores, exit_distributions)
    exits = exit_indices(test_scores, thresholds)  # (B, N)
    n_test = exits.shape[1]
    counts = torch.zeros(exits.shape[0], num_exits, dtype=torch.float64)
    fractions = counts.scatter_add_(1, exits, torch.ones_like(exits, dtype=torch.float64)) / n_test
    correct = test_correct.T.gather(1, exits.T).T  # (B, N): correctness at the chosen exit
    return BudgetedCurve(
        q=q.numpy(),
        thresholds=thresholds.double().numpy(),
        exit_fractions=fractions.numpy(),
        flops=(fractions @ flops_t).numpy(),
        accuracy=(correct.double().mean(dim=1) * 100).numpy(),
        exits=exits,
    )


def anytime_curve(test_correct: torch.Tensor, flops: list[float] | torch.Tensor) -> list[dict]:
    """Each exit's test accuracy (percent) at its cumulative FLOPs."""
    acc = test_correct.double().mean(dim=1) * 100
    return [{"exit": k + 1, "flops": float(flops[k]), "accuracy": float(acc[k])} for k in range(len(acc))]


def accuracy_at_budget(curve_flops: np.ndarray, curve_accuracy: np.ndarray, budget: float) -> float:
    """Accuracy at a FLOPs budget by linear interpolation of the budgeted curve.

    Points are sorted by FLOPs (ties averaged); a budget outside the curve's range gives nan
    rather than an extrapolated number.
    """
    flops = np.asarray(curve_flops, dtype=float)
    acc = np.asarray(curve_accuracy, dtype=float)
    unique, inverse = np.unique(flops, return_inverse=True)
    mean_acc = np.bincount(inverse, weights=acc) / np.bincount(inverse)
    if budget < unique[0] or budget > unique[-1]:
        return float("nan")
    return float(np.interp(budget, unique, mean_acc))


def confidence_exit(
    confidences: torch.Tensor, test_correct: torch.Tensor, cost_ratios: list[float], threshold: float = 0.5
) -> dict:
    """EENets inference: leave at the first exit whose confidence branch is above ``threshold``."""
    above = confidences > threshold
    above[-1, :] = True
    exits = above.to(torch.uint8).argmax(dim=0)
    correct = test_correct.gather(0, exits[None])[0]
    ratios = torch.as_tensor(cost_ratios, dtype=torch.float64)
    return {
        "accuracy": float(correct.double().mean() * 100),
        "cost_ratio": float(ratios[exits].mean()),
        "exit_fractions": (torch.bincount(exits, minlength=len(ratios)).double() / exits.numel()).tolist(),
    }
