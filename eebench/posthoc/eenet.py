"""EENet exit scheduler (Ilhan et al., WACV 2024), fitted post hoc on the val cache.

Written from the description of git-disl/EENet (``utils/predict_helpers.py``,
``utils/predict_utils.py``, ``config.py``).

For exit k, with P_k = softmax(logits_k):

* x_k = [P_k, max P_k, 1 + sum_c P log P / log C, s_1..s_{k-1}], the past scores detached.
* Score head: s_k = clamp(a_k^T P_k + b_k^T [max, ent, s_<k], 0, 1), two bias-free linears.
* Assignment head: r_k = sigmoid(MLP(x_k)), in -> floor(0.5 in) -> 1 with a sigmoid after each
  layer; q(x) = softmax_k r_k(x) is the exit distribution of sample x.
* Loss = (1/K) sum_k sum_n w_nk BCE(s_nk, 1[argmax P_k = y_n]), w_nk = q_nk / sum_n q_nk
  (detached), + alpha_ce KL(normalised s^beta || q) with the element-wise mean of
  ``nn.KLDivLoss()``, + alpha_cost |mean_n sum_k q_nk cost_k - B| / B.
* Adam over mini-batches in one fixed order (a single permutation drawn from ``seed``), with
  alternating ``period``-epoch phases: the score loss alone, then the assignment loss alone. An
  epoch can be kept as "best" only when its mean cost loss is below ``cost_tolerance``.
  Training stops after ``patience`` such epochs without improvement.
* pi = mean_x q(x) on val is the exit distribution the harness's calibration turns into
  thresholds on these scores: n_k = floor(pi_k N) samples leave at exit k, the last exit takes
  the rest.

Budget unit. The reference budgets and costs are latencies in ms per sample (``seconds.csv``).
Here cost_k = cumulative FLOPs of exit k and B is in FLOPs. The cost loss is relative, so only
the ratios between exit costs matter. ``budgets: None`` sweeps ``n_budgets`` targets spread evenly
over the open interval of expected costs that this assignment head can reach at all. A softmax of
sigmoid outputs keeps each q_k between 1/(1 + (K-1)e) and e/(e + K - 1), so budgets near F_1 or F_K
are out of reach. The reference sweeps ``linspace(F_1, F_K, 20)``, ends included.

Protocol. The reference fits 10 random trials per budget and keeps the one with the best val
accuracy among those whose expected cost is within 10% of the budget. ``trials`` defaults to 1
for speed (set 10 to match). With several trials the accuracy and cost are those of the harness
threshold rule on val; the reference uses the cost implied by pi. When no trial is within
``budget_tolerance``, the trial closest to the budget is kept (the reference keeps its last
trial).

Defects of the reference that are not reproduced:

* ``compute_loss`` returns an undefined ``ce_loss`` (NameError), so no scheduler can be fitted
  as released; only cached pickles for three budgets exist.
* ``ScoreNormalizer`` adds an (N, 1) class-probability term to an (N, 1, 1) term, which
  broadcasts to (N, N, 1), then keeps ``[:, 0]``: sample 0's class-probability term is used for
  every sample. Here each sample uses its own. (The resulting (N, 1) score also cannot be
  concatenated with the next exit's 2-D input, so exit 2 would crash as well; checked by running
  the shapes in torch.)
* The training loop never calls ``zero_grad``, so every step follows the sum of all past
  gradients, and the alternating phases never isolate one loss. Here gradients are reset each
  step, and the heads outside the current phase's loss are not stepped.
  This changes what weight decay does. With gradients reset, the reference's coupled L2 term
  (``Adam(weight_decay=1e-2)``) is larger than the assignment-loss gradients (alpha_cost 1e-2
  times a relative cost error: about 1e-4 to 1e-3). It then holds q near uniform whatever the
  budget: measured, the cost error stalls at 10% where AdamW reaches 0.1%. In the reference,
  the ever-growing accumulated gradient made the same term negligible. The default
  ``weight_decay_mode: decoupled`` (AdamW, same lr and decay) lets the heads move; ``l2`` is the
  reference's optimiser with the gradient reset.
* The "best" model is stored by reference (``best_model = m``), so it is always the last state.
  Here the best state is copied and restored.
* "Best" compares the phase-masked loss (score loss in one phase, assignment loss in the other).
  Here it compares the full loss.
* Training feeds the clamped past scores to later exits, while test time feeds the unclamped
  ones (``predict``). Here both use the clamped scores.
* Found by running the reference with ``ce_loss`` patched: its last exit's threshold is 0, so
  the samples whose clamped score is 0 never exit (about 10% of test samples); an exit where no
  sample should leave gets threshold 1, which a score of exactly 1 still passes; and a sample whose
  scores all clamp to 0 gets a NaN KL target (0/0). Here the thresholds come from the harness
  calibration (the last exit takes everyone left, an exit with n_k = 0 takes nobody) and such a
  sample gets a zero KL target.

Other choices. The exit score passed to the calibration is the unclamped linear output (clamp is
monotone, and this avoids ties at 0 and 1, which would make more than n_k samples leave).
0 log 0 is taken as 0 in the entropy feature (the reference gets NaN). A sample whose scores are
all 0 gets a zero KL target. The K heads of all budgets and trials train together as one batch of
independent models: Adam's update is element-wise, so this is the same as separate fits, with
patience and "best" tracked per model. Each model is initialised like ``nn.Linear`` from a seed
derived from (``seed``, budget index, trial). The fit runs single-threaded by default
(``threads``): its tensors are small, and intra-op threading only adds overhead.
Each step is O(models x K x batch x in x floor(0.5 in)).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from models import ExitHead

from ..calibration import exit_indices, exit_thresholds
from ..scored import ScoredOutputs
from . import register_posthoc
from .base import PosthocMethod

INFERENCE_ELEMENTS = 1 << 22  # models x exits x samples x inputs held at once when scoring


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- inputs ------------------------------------------------------------------------------------
def exit_features(logits: torch.Tensor) -> torch.Tensor:
    """(K, N, C + 2): [P_k, max P_k, 1 + sum P log P / log C] for every exit."""
    probs = logits.float().softmax(dim=-1)
    top = probs.max(dim=-1, keepdim=True).values
    neg_entropy = 1 + torch.special.xlogy(probs, probs).sum(dim=-1, keepdim=True) / math.log(probs.shape[-1])
    return torch.cat([probs, top, neg_entropy], dim=-1)


def reachable_cost_range(costs: torch.Tensor) -> tuple[float, float]:
    """Lowest and highest mean of sum_k q_k cost_k when q = softmax of values in [0, 1].

    The extremes put r = 1 on a set of exits and r = 0 on the rest; for a linear objective the best
    set is a prefix (lowest) or a suffix (highest) of the exits sorted by cost.
    """
    c = costs.double().sort().values
    k = len(c)
    e = math.e
    means = []
    for j in range(k + 1):  # r = 1 on the j cheapest exits, then on the j dearest
        low = (e * c[:j].sum() + c[j:].sum()) / (e * j + (k - j))
        high = (c[: k - j].sum() + e * c[k - j :].sum()) / ((k - j) + e * j)
        means.append((float(low), float(high)))
    return min(m[0] for m in means), max(m[1] for m in means)


# --- the batched scheduler ---------------------------------------------------------------------
class SchedulerBank:
    """M independent EENet schedulers (K score heads + K assignment heads each) as batched tensors.

    Unused entries (past scores an exit does not see, hidden units beyond floor(0.5 in)) are zero
    and masked, so they never receive a gradient.
    """

    def __init__(self, num_exits: int, num_classes: int, hidden_ratio: float, seeds: list[int]):
        self.K, self.C = num_exits, num_classes
        in_dims = [num_classes + 2 + k for k in range(num_exits)]
        hidden = [int(d * hidden_ratio) for d in in_dims]
        if min(hidden) < 1:
            raise ValueError("hidden_ratio gives an empty hidden layer")
        self.D, self.H = in_dims[-1], max(hidden)
        k_idx = torch.arange(num_exits)
        self.past_mask = (torch.arange(num_exits - 1)[None, :] < k_idx[:, None]).float()  # (K, K-1)
        self.hidden_mask = (torch.arange(self.H)[None, :] < torch.tensor(hidden)[:, None]).float()  # (K, H)
        input_mask = (torch.arange(self.D)[None, :] < torch.tensor(in_dims)[:, None]).float()  # (K, D)
        self.unit_mask = self.hidden_mask[:, :, None] * input_mask[:, None, :]  # (K, H, D)
        models = [self._init_one(in_dims, hidden, seed) for seed in seeds]
        self.params = {name: torch.stack([m[name] for m in models]).requires_grad_() for name in models[0]}

    def _init_one(self, in_dims: list[int], hidden: list[int], seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        K, C = self.K, self.C

        def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
            bound = 1 / math.sqrt(fan_in)
            return (torch.rand(shape, generator=gen) * 2 - 1) * bound

        a = torch.zeros(K, C + 2)  # on [P_k, max, ent]: q_layer_1 and the first two of q_layer_2
        b = torch.zeros(K, max(K - 1, 1))  # on past scores s_1..s_{k-1}: the rest of q_layer_2
        w1 = torch.zeros(K, self.H, self.D)
        c1 = torch.zeros(K, self.H)
        w2 = torch.zeros(K, self.H)
        c2 = torch.zeros(K)
        for k in range(K):
            d, h = in_dims[k], hidden[k]
            a[k, :C] = uniform((C,), C)
            extra = uniform((2 + k,), 2 + k)
            a[k, C:], b[k, :k] = extra[:2], extra[2:]
            w1[k, :h, :d] = uniform((h, d), d)
            c1[k, :h] = uniform((h,), d)
            w2[k, :h] = uniform((h,), h)
            c2[k] = uniform((1,), h)[0]
        return {"a": a, "b": b, "w1": w1, "c1": c1, "w2": w2, "c2": c2}

    def forward(
        self, feats: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """feats (K, n, C+2) -> raw scores, clamped scores and assignment outputs r, each (M, K, n)."""
        p = self.params if params is None else params
        M = p["a"].shape[0]
        base = torch.einsum("knd,mkd->mkn", feats, p["a"])
        raw: list[torch.Tensor] = []
        clamped: list[torch.Tensor] = []
        for k in range(self.K):
            raw.append(self.raw_score(k, base[:, k], clamped, p))
            clamped.append(raw[-1].clamp(0, 1))
        raw_t, clamped_t = torch.stack(raw, dim=1), torch.stack(clamped, dim=1)
        past = clamped_t.detach().transpose(1, 2)[:, None, :, :-1] * self.past_mask[None, :, None, :]
        x = torch.cat([feats.expand(M, -1, -1, -1), past], dim=-1)  # (M, K, n, D)
        w1 = p["w1"] * self.unit_mask
        hid = torch.sigmoid(torch.einsum("mknd,mkhd->mknh", x, w1) + (p["c1"] * self.hidden_mask)[:, :, None, :])
        r = torch.einsum("mknh,mkh->mkn", hid, p["w2"] * self.hidden_mask) + p["c2"][..., None]
        return raw_t, clamped_t, torch.sigmoid(r)

    @staticmethod
    def raw_score(
        k: int, base_k: torch.Tensor, clamped: list[torch.Tensor], params: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Exit k's unclamped score (M, n): a_k^T [P_k, max, ent] (``base_k``) plus b_k^T of the
        clamped, detached scores of exits 1..k-1 (``clamped``, k tensors (M, n))."""
        if k == 0:
            return base_k
        past = torch.stack(clamped, dim=-1).detach()  # (M, n, k)
        return base_k + (past * params["b"][:, k, None, :k]).sum(dim=-1)


@dataclass
class LossTerms:
    bce: torch.Tensor  # (M,)
    kl: torch.Tensor
    cost: torch.Tensor  # relative cost error |E[cost] - B| / B


def scheduler_loss(
    scores: torch.Tensor,
    r: torch.Tensor,
    correct: torch.Tensor,
    costs: torch.Tensor,
    budgets: torch.Tensor,
    beta: float = 1.0,
) -> LossTerms:
    """Per-model EENet loss terms.

    scores (M, K, n) clamped to [0, 1]; r (M, K, n) assignment-head outputs; correct (K, n) 0/1;
    costs (K,); budgets (M,).
    """
    log_q = torch.log_softmax(r, dim=1)
    q = log_q.exp()
    weight = q.detach() / q.detach().sum(dim=2, keepdim=True)
    bce = F.binary_cross_entropy(scores, correct[None].expand_as(scores).to(scores.dtype), reduction="none")
    bce = (weight * bce).sum(dim=(1, 2)) / scores.shape[1]
    target = scores.detach() ** beta
    target = target / target.sum(dim=1, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)
    kl = (torch.special.xlogy(target, target) - target * log_q).mean(dim=(1, 2))
    expected = (q * costs.to(q.dtype)[None, :, None]).sum(dim=1).mean(dim=1)
    cost = (expected - budgets).abs() / budgets
    return LossTerms(bce, kl, cost)


@register_posthoc
class EENet(PosthocMethod):
    """Learned per-exit scores and exit distribution, one scheduler per FLOPs budget."""

    name = "eenet"

    @dataclass
    class Params:
        budgets: list[float] | None = None  # FLOPs targets; None: n_budgets reachable targets
        n_budgets: int = 8
        trials: int = 1  # reference: 10
        epochs: int = 1000
        batch_size: int | None = 512  # None: full batch
        lr: float = 3e-5
        weight_decay: float = 1e-2
        weight_decay_mode: Literal["decoupled", "l2"] = "decoupled"  # AdamW, or Adam's L2 term
        alpha_ce: float = 1e-3
        alpha_cost: float = 1e-2
        beta_ce: float = 1.0
        hidden_ratio: float = 0.5
        period: int = 10  # epochs per alternating phase; <= 1 trains both losses together
        patience: int = 100
        cost_tolerance: float = 0.1  # cost loss below which an epoch may be kept as best
        budget_tolerance: float = 0.1  # trials within this relative cost error are eligible
        threads: int | None = 1  # intra-op threads while fitting; None: torch's setting

        def validate(self) -> None:
            if min(self.n_budgets, self.trials, self.epochs, self.patience) < 1:
                raise ValueError("n_budgets, trials, epochs and patience must be >= 1")
            if self.batch_size is not None and self.batch_size < 1:
                raise ValueError("batch_size must be >= 1 or null")
            if self.budgets is not None and (not self.budgets or min(self.budgets) <= 0):
                raise ValueError("budgets must be a non-empty list of positive FLOPs")
            if self.lr <= 0 or self.hidden_ratio <= 0:
                raise ValueError("lr and hidden_ratio must be > 0")
            if self.threads is not None and self.threads < 1:
                raise ValueError("threads must be >= 1 or null")

    test_params = {"n_budgets": 2, "epochs": 60, "lr": 1e-2, "period": 5, "patience": 20, "batch_size": 256}

    def __init__(self, params: Any, flops: list[float], seed: int = 0):
        super().__init__(params, flops, seed)
        self.budgets = self._budget_targets()
        self.chosen: dict[str, torch.Tensor] = {}
        self.bank: SchedulerBank | None = None
        self.exit_distributions: torch.Tensor | None = None
        self.fit_record: dict[str, torch.Tensor] = {}

    def _budget_targets(self) -> torch.Tensor:
        if self.params.budgets is not None:
            return torch.tensor(self.params.budgets, dtype=torch.float64)
        low, high = reachable_cost_range(self.flops)
        n = self.params.n_budgets
        return low + (high - low) * torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)

    def _seed(self, budget: int, trial: int) -> int:
        return int(np.random.SeedSequence([self.seed, budget, trial]).generate_state(1)[0])

    def fit(self, val: dict[str, Any], train: dict[str, Any] | None = None) -> None:
        p = self.params
        feats = exit_features(val["logits"])
        correct = (val["logits"].argmax(dim=-1) == val["labels"][None]).float()
        n_b, n_t = len(self.budgets), p.trials
        seeds = [self._seed(b, t) for b in range(n_b) for t in range(n_t)]  # model m = b * n_t + t
        bank = SchedulerBank(feats.shape[0], feats.shape[2] - 2, p.hidden_ratio, seeds)
        budgets = self.budgets.float().repeat_interleave(n_t)
        with intra_op_threads(p.threads):
            best = self._train(bank, feats, correct, budgets)
            raw, pi = self._evaluate(bank, feats, best)
        chosen = self._choose_trials(raw, pi, correct)
        self.bank = bank
        self.chosen = {
            name: t.view(n_b, n_t, *t.shape[1:])[torch.arange(n_b), chosen].clone() for name, t in best.items()
        }
        self.exit_distributions = pi.view(n_b, n_t, -1)[torch.arange(n_b), chosen].double()
        self.fit_record["trial"] = chosen

    def _train(
        self, bank: SchedulerBank, feats: torch.Tensor, correct: torch.Tensor, budgets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        p = self.params
        n, n_models = feats.shape[1], len(budgets)
        costs = self.flops.float()
        adam = torch.optim.AdamW if p.weight_decay_mode == "decoupled" else torch.optim.Adam
        optimizer = adam(bank.params.values(), lr=p.lr, weight_decay=p.weight_decay, foreach=True)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        step = n if p.batch_size is None else p.batch_size
        batches = [order[i : i + step] for i in range(0, n, step)]
        best = {name: t.detach().clone() for name, t in bank.params.items()}
        best_loss = torch.full((n_models,), math.inf)
        patience = torch.full((n_models,), p.patience)
        for epoch in range(p.epochs):
            score_phase = p.period <= 1 or (epoch // p.period) % 2 == 0
            assign_phase = p.period <= 1 or not score_phase
            total = torch.zeros(n_models)
            cost_err = torch.zeros(n_models)
            for idx in batches:
                _, scores, r = bank.forward(feats[:, idx])
                terms = scheduler_loss(scores, r, correct[:, idx], costs, budgets, p.beta_ce)
                assign = p.alpha_ce * terms.kl + p.alpha_cost * terms.cost
                loss = terms.bce * score_phase + assign * assign_phase
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()
                optimizer.step()
                total += (terms.bce + assign).detach()
                cost_err += terms.cost.detach()
            total, cost_err = total / len(batches), cost_err / len(batches)
            active = patience > 0
            eligible = active & (cost_err < p.cost_tolerance)
            improved = eligible & (total < best_loss)
            for name, t in bank.params.items():
                best[name][improved] = t.detach()[improved]
            best_loss = torch.where(improved, total, best_loss)
            patience = torch.where(
                improved, torch.full_like(patience, p.patience), patience - (eligible & ~improved).long()
            )
            if not bool((patience > 0).any()):
                break
        never = torch.isinf(best_loss)  # never met the cost tolerance: keep the last state
        for name, t in bank.params.items():
            best[name][never] = t.detach()[never]
        return best

    def _evaluate(
        self, bank: SchedulerBank, feats: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw scores (M, K, N) and exit distributions pi = mean_x q(x) (M, K)."""
        raws, q_sum = [], 0
        chunk = max(1, INFERENCE_ELEMENTS // (len(params["a"]) * bank.K * bank.D))
        with torch.no_grad():
            for i in range(0, feats.shape[1], chunk):
                raw, _, r = bank.forward(feats[:, i : i + chunk], params)
                raws.append(raw)
                q_sum = q_sum + r.softmax(dim=1).double().sum(dim=2)
        return torch.cat(raws, dim=2), q_sum / feats.shape[1]

    def _choose_trials(self, raw: torch.Tensor, pi: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        """Per budget, the trial with the best val accuracy within ``budget_tolerance`` of its cost."""
        n_b, n_t = len(self.budgets), self.params.trials
        exits = exit_indices(raw, exit_thresholds(raw, pi))  # (M, N)
        accuracy = correct.T.gather(1, exits.T).T.double().mean(dim=1).view(n_b, n_t)
        cost = self.flops[exits].mean(dim=1).view(n_b, n_t)
        error = (cost - self.budgets[:, None]).abs() / self.budgets[:, None]
        ok = error < self.params.budget_tolerance
        best_ok = torch.where(ok, accuracy, torch.full_like(accuracy, -1.0)).argmax(dim=1)
        chosen = torch.where(ok.any(dim=1), best_ok, error.argmin(dim=1))
        idx = torch.arange(n_b)
        self.fit_record.update(val_accuracy=accuracy[idx, chosen], val_flops=cost[idx, chosen])
        return chosen

    def score(self, cache: dict[str, Any]) -> ScoredOutputs:
        if self.bank is None:
            raise RuntimeError("eenet: call fit before score")
        feats = exit_features(cache["logits"])
        with intra_op_threads(self.params.threads):
            raw, _ = self._evaluate(self.bank, feats, self.chosen)
        probs = cache["logits"].float().softmax(dim=-1)
        return ScoredOutputs(
            scores=raw,
            predictions=probs.argmax(dim=-1),
            probabilities=probs,
            exit_distributions=self.exit_distributions.clone(),
            budget_targets=self.budgets.clone(),
        )

    def score_exit(self, k: int, head: ExitHead, carry: Any, budget: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``score`` at exit k for the scheduler of ``budget``; the carry is the clamped scores of
        exits 1..k-1, (n, M) each, computed for every budget's scheduler at once as ``score`` does
        (the same kernels, so the same float rounding)."""
        if self.bank is None:
            raise RuntimeError("eenet: call fit (or load_state_dict) before score_exit")
        logits = head.logits.cpu()
        feats = exit_features(logits[None])  # (1, n, C + 2)
        clamped = [] if carry is None else [c.T for c in carry]  # (M, n) each
        with intra_op_threads(self.params.threads):
            base = torch.einsum("knd,mkd->mkn", feats, self.chosen["a"][:, k : k + 1])[:, 0]
            raw = self.bank.raw_score(k, base, clamped, self.chosen)
        carry = [c.T for c in clamped] + [raw.clamp(0, 1).T]
        return raw[budget], logits.float().softmax(dim=-1).argmax(dim=-1), carry

    def state_dict(self) -> dict[str, Any]:
        state = {f"param_{k}": v for k, v in self.chosen.items()}
        state.update(budget_targets=self.budgets, exit_distributions=self.exit_distributions, **self.fit_record)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chosen = {key[len("param_") :]: value for key, value in state.items() if key.startswith("param_")}
        n_budgets, num_exits, width = self.chosen["a"].shape
        if num_exits != len(self.flops):
            raise ValueError(f"eenet: the fitted state has {num_exits} exits, the network {len(self.flops)}")
        self.bank = SchedulerBank(num_exits, width - 2, self.params.hidden_ratio, seeds=[0])
        self.budgets = state["budget_targets"]
        self.exit_distributions = state["exit_distributions"]
        self.fit_record = {key: state[key] for key in ("trial", "val_accuracy", "val_flops") if key in state}
