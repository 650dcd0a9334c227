"""Calibrated-DNN (Meronen et al., 2023, "Fixing overconfidence in dynamic neural networks").

Per-exit last-layer Laplace with a KFAC posterior, plus model-internal ensembling (MIE), written
from the description of AaltoML/calibrated-dnn (``laplace.py``, ``adaptive_inference.py``).

Last-layer Laplace from caches alone. Exit k's final layer is f = W phi~ with phi~ = [phi; 1]
(weight and bias). The cached logits are the MAP outputs W phi~ and the cached features are phi,
which is all the KFAC factors and the predictive need; W itself is never used.

* KFAC factors over one pass of the training split in batches (the reference loader's batch size,
  64 for CIFAR): per batch, U_b = mean_n g_n g_n^T with g_n = softmax_n - onehot(y~_n), where
  y~_n ~ Categorical(softmax_n) is one Monte-Carlo label (what backpack's ``KFAC()`` returns for
  a mean-reduced cross-entropy; the true labels are never used), and V_b = mean_n phi~_n phi~_n^T.
  A running average with rho_i = min(1 - 1/(i+1), 0.95) combines the batches, so the last ~20
  batches dominate. Then both factors are multiplied by sqrt(n_data).
* Prior: U + sqrt(1/var0) I, V + sqrt(1/var0) I; Sigma_U, Sigma_V are their inverses.
* Predictive: s = phi~^T Sigma_V phi~, p = mean_m softmax((f + sqrt(s) L_U z_m) / T),
  L_U = chol(Sigma_U), z_m ~ N(0, I_C).
* MIE: p_bar_k = sum_{i<=k} w_i p_i / sum_{i<=k} w_i with w_i = F_i / F_K.
* Tuning: grid over temperature x var0 by val NLL; per exit independently without MIE,
  exit by exit on the ensembled prediction with MIE. Ties go to the first grid point in
  temperature-major order (the reference picks the minimum with ``nonzero()`` and fails on a tie).

Deviations from the reference, and why:

* The z_m are drawn once from ``seed`` and shared by the grid search, val and test. The reference
  redraws them (unseeded) on every call: for every grid point and again for val and for test.
  Fixed draws make the search and the outputs reproducible, and every grid point is compared on
  the same noise.
* The training-split order is a seeded shuffle (``shuffle``), like the reference's random sampler.
  The running average weights late batches most, so the order matters.
* ``n_data`` defaults to the size of the training split (the cache's ``split_size``: the whole
  split, also when ``train_cache_samples`` keeps only a subsample of it). The reference multiplies by
  ``len(train_loader.dataset)``, which with ``--use-valid`` is the whole CIFAR train set (50000)
  although only the 45000 training-split images go through the loader. Set ``n_data`` to 50000 to
  match it.
* The training-split cache is computed without augmentation. The reference passes augmented
  training images (eval-mode network) through its loader.
* ``curvature: kflr`` replaces the one-sample Monte-Carlo label by its expectation,
  diag(p) - p p^T (backpack's ``KFLR``). It is deterministic; the default ``kfac`` is the
  reference's.

``laplace-torch`` (0.3) is not used. It needs the network's last layer as a module with its weights
and a data loader, pins ``asdfghjkl==0.1a4`` and pulls in backpack, curvlinops and torchvision.
Its Kronecker prior is also not the reference's sqrt(1/var0)-per-factor damping with a running
average over batches. The factors above are a few lines of linear algebra on the cached tensors.

Cost. Tuning reads only the label's predictive probability; tuning and scoring are chunked to
about 16 MB of Monte-Carlo logits at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from models import ExitHead

from ..metrics import log_loss
from ..scored import ScoredOutputs
from . import register_posthoc
from .base import PosthocMethod

TEMPERATURE_GRID = [0.3, 0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0]
VAR0_GRID = [0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0, 4.0]
RHO_MAX = 0.95
MC_ELEMENTS_PER_CHUNK = 1 << 22  # samples x MC draws x classes held at once


# --- KFAC factors ------------------------------------------------------------------------------
def augment(features: torch.Tensor) -> torch.Tensor:
    """phi~ = [phi; 1] in float64."""
    phi = features.double().flatten(1)
    return torch.cat([phi, torch.ones(phi.shape[0], 1, dtype=phi.dtype)], dim=1)


def running_average_weights(n_samples: int, batch_size: int) -> torch.Tensor:
    """Per-sample weights a_n with sum_n a_n x_n = the reference's running average of batch means.

    Batch i (0-based) enters with rho_i = min(1 - 1/(i+1), 0.95): F <- rho_i F + (1 - rho_i) X_i,
    so its final weight is (1 - rho_i) prod_{j>i} rho_j, shared by its samples.
    """
    n_batches = -(-n_samples // batch_size)
    rho = torch.tensor([min(1 - 1 / (i + 1), RHO_MAX) for i in range(n_batches)], dtype=torch.float64)
    later = torch.cat([rho.flip(0).cumprod(0).flip(0)[1:], torch.ones(1, dtype=torch.float64)])
    batch_weight = (1 - rho) * later
    batch_of = torch.arange(n_samples) // batch_size
    sizes = torch.bincount(batch_of, minlength=n_batches).double()
    return (batch_weight / sizes)[batch_of]


def kfac_factors(
    logits: torch.Tensor,
    features: torch.Tensor,
    batch_size: int,
    curvature: str = "kfac",
    generator: torch.Generator | None = None,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running-averaged KFAC factors (U (C, C), V (d+1, d+1)) of one exit, before the sqrt(N) scale.

    ``order`` is the sample order in which batches are formed (default: as given).
    """
    if order is not None:
        logits, features = logits[order], features[order]
    probs = logits.double().softmax(dim=1)
    phi = augment(features)
    weights = running_average_weights(len(probs), batch_size)
    if curvature == "kfac":
        sampled = torch.multinomial(probs, 1, generator=generator)[:, 0]
        g = probs - torch.nn.functional.one_hot(sampled, probs.shape[1]).double()
        u = g.T @ (weights[:, None] * g)
    elif curvature == "kflr":
        u = torch.diag(weights @ probs) - probs.T @ (weights[:, None] * probs)
    else:
        raise ValueError(f"unknown curvature {curvature!r}; allowed: kfac, kflr")
    v = phi.T @ (weights[:, None] * phi)
    return u, v


def posterior(u: torch.Tensor, v: torch.Tensor, var0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_U, Sigma_V): Cholesky factor of the output covariance and the input covariance."""
    damping = (1.0 / var0) ** 0.5
    sigma_u = torch.linalg.inv(u + damping * torch.eye(len(u), dtype=u.dtype))
    sigma_v = torch.linalg.inv(v + damping * torch.eye(len(v), dtype=v.dtype))
    sigma_u = (sigma_u + sigma_u.T) / 2  # inverse of a symmetric matrix, symmetrised for cholesky
    return torch.linalg.cholesky(sigma_u), sigma_v


# --- predictive --------------------------------------------------------------------------------
def logit_noise(
    features: torch.Tensor, l_u: torch.Tensor, sigma_v: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(s) (N,), L_U z_m (M, C)): the logit sample m of input n is f_n + sqrt(s_n) L_U z_m."""
    phi = augment(features)
    s = ((phi @ sigma_v) * phi).sum(dim=1).clamp_min(0)
    return s.sqrt().float(), (z.double() @ l_u.T).float()


def _chunks(n: int, per_sample: int) -> list[slice]:
    step = max(1, MC_ELEMENTS_PER_CHUNK // max(1, per_sample))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def mc_predictive(logits: torch.Tensor, sd: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, C) mean over the M draws of softmax((f + sd * noise_m) / T)."""
    out = torch.empty_like(logits, dtype=torch.float32)
    for part in _chunks(len(logits), noise.numel()):
        sample = logits[part, None, :].float() + sd[part, None, None] * noise[None]
        out[part] = (sample / temperature).softmax(dim=-1).mean(dim=1)
    return out


def mc_label_probability(
    logits: torch.Tensor, sd: torch.Tensor, noise: torch.Tensor, temperatures: list[float], labels: torch.Tensor
) -> torch.Tensor:
    """(len(temperatures), N) predictive probability of each label, for every temperature.

    Only the label's entry is needed for the NLL (and for MIE's ensembled NLL, which is linear in
    the per-exit probabilities), so the full (N, M, C) softmax is never stored.
    """
    out = torch.empty(len(temperatures), len(logits), dtype=torch.float32)
    for part in _chunks(len(logits), noise.numel()):
        sample = logits[part, None, :].float() + sd[part, None, None] * noise[None]
        centered = sample - sample.amax(dim=-1, keepdim=True)  # <= 0: exp never overflows, any T > 0
        at_label = centered.gather(2, labels[part, None, None].expand(-1, sample.shape[1], 1))[..., 0]
        for t, temp in enumerate(temperatures):
            total = centered.mul(1 / temp).exp_().sum(dim=-1)
            out[t, part] = ((at_label / temp).exp() / total).mean(dim=1)
    return out


def ensemble(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MIE: (K, ...) per-exit probabilities -> the weighted mean of exits 1..k at each k."""
    w = weights.to(probs.dtype).view(-1, *([1] * (probs.dim() - 1)))
    return (w * probs).cumsum(dim=0) / w.cumsum(dim=0)


def select_grid(label_probs: torch.Tensor, weights: torch.Tensor, mie: bool) -> list[tuple[int, int]]:
    """Per-exit (temperature index, var0 index) minimising val NLL.

    ``label_probs``: (K, n_T, n_var0, N) predictive probability of the true label at each grid
    point. Without MIE each exit is tuned alone; with MIE exit k is tuned on the ensemble of
    exits 1..k with exits 1..k-1 fixed at their chosen points.
    """
    choice = []
    acc = torch.zeros(label_probs.shape[-1], dtype=torch.float64)  # sum_{i<k} w_i p_i(y)
    w_sum = 0.0
    for k in range(label_probs.shape[0]):
        candidate = label_probs[k].double()
        if mie:
            w_k = float(weights[k])
            candidate = (acc + w_k * candidate) / (w_sum + w_k)
        nll = log_loss(candidate).mean(dim=-1)  # (n_T, n_var0): metrics.nll on each grid point
        flat = int(torch.argmin(nll.flatten()))  # first minimum, temperature-major
        t, v = divmod(flat, nll.shape[1])
        choice.append((t, v))
        if mie:
            acc += w_k * label_probs[k, t, v].double()
            w_sum += w_k
    return choice


def _features(cache: dict[str, Any]) -> list[torch.Tensor]:
    if cache.get("features") is None:
        raise ValueError("calibrated_dnn needs each exit head's penultimate features in the cache")
    return cache["features"]


# --- the method --------------------------------------------------------------------------------
@register_posthoc
class CalibratedDNN(PosthocMethod):
    """Last-layer KFAC Laplace per exit, temperature, and model-internal ensembling."""

    name = "calibrated_dnn"
    needs_train_split = True

    @dataclass
    class Params:
        mie: bool = True
        optimize: bool = True  # grid-search temperature and var0 on val NLL
        var0: float = 2.0  # prior variance, used when optimize is false
        temperature: float = 1.0  # used when optimize is false
        n_mc_samples: int = 50
        temperature_grid: list[float] = field(default_factory=lambda: list(TEMPERATURE_GRID))
        var0_grid: list[float] = field(default_factory=lambda: list(VAR0_GRID))
        batch_size: int = 64  # training-split batch size of the KFAC running average
        curvature: Literal["kfac", "kflr"] = "kfac"
        shuffle: bool = True  # seeded shuffle of the training split before batching
        n_data: int | None = None  # sqrt(n_data) factor scale; None: training-split size

        def validate(self) -> None:
            if self.n_mc_samples < 1 or self.batch_size < 1:
                raise ValueError("n_mc_samples and batch_size must be >= 1")
            if self.n_data is not None and self.n_data < 1:
                raise ValueError("n_data must be >= 1")
            values = [self.var0, self.temperature, *self.temperature_grid, *self.var0_grid]
            if not self.temperature_grid or not self.var0_grid or min(values) <= 0:
                raise ValueError("temperatures and var0 values must be > 0 and the grids non-empty")

    test_params = {"n_mc_samples": 8, "temperature_grid": [0.5, 1.0, 2.0], "var0_grid": [0.5, 2.0], "batch_size": 16}

    def __init__(self, params: Any, flops: list[float], seed: int = 0):
        super().__init__(params, flops, seed)
        self.u: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.temperatures: list[float] = []
        self.var0s: list[float] = []
        self.z: torch.Tensor | None = None
        self._posteriors: tuple[tuple, list[tuple[torch.Tensor, torch.Tensor]]] | None = None  # (var0s, (L_U, Sigma_V))

    @property
    def weights(self) -> torch.Tensor:
        return self.flops / self.flops[-1]

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + stream)

    def fit_factors(self, train: dict[str, Any]) -> None:
        """KFAC factors of every exit from the training-split cache (labels are not read)."""
        p = self.params
        logits, features = train["logits"], _features(train)
        n = logits.shape[1]
        gen = self._generator(1)
        order = torch.randperm(n, generator=gen) if p.shuffle else None
        # the cache may hold a subsample (train_cache_samples); the curvature is of the whole split
        split_size = int(train.get("split_size", n))
        scale = float(p.n_data if p.n_data is not None else split_size) ** 0.5
        self.u, self.v, self._posteriors = [], [], None
        for k in range(logits.shape[0]):
            u, v = kfac_factors(logits[k], features[k], p.batch_size, p.curvature, gen, order)
            self.u.append(scale * u)
            self.v.append(scale * v)

    def fit(self, val: dict[str, Any], train: dict[str, Any] | None = None) -> None:
        if train is None:
            raise ValueError("calibrated_dnn needs the training-split cache (needs_train_split)")
        p = self.params
        self.fit_factors(train)
        num_classes = val["logits"].shape[2]
        self.z = torch.randn(p.n_mc_samples, num_classes, generator=self._generator(2), dtype=torch.float64)
        temps = p.temperature_grid if p.optimize else [p.temperature]
        var0s = p.var0_grid if p.optimize else [p.var0]
        self._posteriors = None
        if len(temps) * len(var0s) == 1:
            self.temperatures = [temps[0]] * len(self.u)
            self.var0s = [var0s[0]] * len(self.u)
            return
        labels = val["labels"].long()
        table = torch.stack(
            [
                torch.stack(
                    [
                        mc_label_probability(
                            val["logits"][k],
                            *self._noise(posterior(self.u[k], self.v[k], var0), _features(val)[k]),
                            temps,
                            labels,
                        )
                        for var0 in var0s
                    ],
                    dim=1,
                )
                for k in range(len(self.u))
            ]
        )  # (K, n_T, n_var0, N)
        choice = select_grid(table, self.weights, p.mie)
        self.temperatures = [temps[t] for t, _ in choice]
        self.var0s = [var0s[v] for _, v in choice]

    def _noise(
        self, fitted_posterior: tuple[torch.Tensor, torch.Tensor], features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return logit_noise(features, *fitted_posterior, self.z)

    def posteriors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(L_U, Sigma_V) of every exit at its chosen var0, computed once."""
        if self.z is None:
            raise RuntimeError("calibrated_dnn: call fit (or load_state_dict) before score")
        key = tuple(self.var0s)  # recomputed when var0 (or, through fit and loading, U and V) change
        if self._posteriors is None or self._posteriors[0] != key:
            self._posteriors = (key, [posterior(u, v, var0) for u, v, var0 in zip(self.u, self.v, self.var0s)])
        return self._posteriors[1]

    def exit_predictive(self, k: int, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(N, C) Laplace predictive of exit k, before ensembling."""
        return mc_predictive(logits, *self._noise(self.posteriors()[k], features), self.temperatures[k])

    def predictive(self, cache: dict[str, Any]) -> torch.Tensor:
        """(K, N, C) Laplace predictive of every exit, before ensembling."""
        features = _features(cache)
        return torch.stack([self.exit_predictive(k, cache["logits"][k], features[k]) for k in range(len(self.u))])

    def score(self, cache: dict[str, Any]) -> ScoredOutputs:
        probs = self.predictive(cache)
        if self.params.mie:
            probs = ensemble(probs, self.weights)
        top, predictions = probs.max(dim=-1)
        return ScoredOutputs(scores=top, predictions=predictions, probabilities=probs)

    def score_exit(self, k: int, head: ExitHead, carry: Any, budget: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``score`` at exit k from exit k alone; with MIE the carry is the running sum
        sum_{i<=k} w_i p_i, in float64 as ``cumsum`` accumulates it in ``ensemble``."""
        if head.features is None:
            raise ValueError("calibrated_dnn needs each exit head's penultimate features")
        probs = self.exit_predictive(k, head.logits.cpu(), head.features.flatten(1).cpu())
        if self.params.mie:
            weights = self.weights.to(probs.dtype)
            carry = (weights[k] * probs).double() + (0.0 if carry is None else carry)
            probs = carry.to(probs.dtype) / weights.cumsum(dim=0)[k]
        top, predictions = probs.max(dim=-1)
        return top, predictions, carry

    def state_dict(self) -> dict[str, Any]:
        return {
            "temperatures": list(self.temperatures),
            "var0": list(self.var0s),
            "kfac_u": list(self.u),
            "kfac_v": list(self.v),
            "z": self.z,
            "mie_weights": self.weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["kfac_u"]) != len(self.flops):
            raise ValueError(
                f"calibrated_dnn: the fitted state has {len(state['kfac_u'])} exits, the network {len(self.flops)}"
            )
        self.temperatures, self.var0s = list(state["temperatures"]), list(state["var0"])
        self.u, self.v, self.z = list(state["kfac_u"]), list(state["kfac_v"]), state["z"]
        self._posteriors = None
