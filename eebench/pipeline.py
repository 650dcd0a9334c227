"""One function per workflow stage; the Snakemake scripts only pass paths and config to these.

Stages: split -> flops -> train -> infer -> (posthoc) -> evaluate -> aggregate -> report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models import InputSpec, MultiExitNetwork, build_model

from . import bootstrap, distributed, imagefolder, io, metrics, summary
from .augment import normalize
from .cache import CACHE_FORMAT, check_meta, correctness, load_cache, scored_outputs
from .calibration import anytime_curve, budgeted_curve, confidence_exit
from .checkpoints import convert_checkpoint
from .config import (
    Cell,
    architecture,
    cell_fingerprint,
    check_budgets,
    content_hash,
    dependencies,
    is_posthoc,
    is_pretrained,
    posthoc_variant,
    pretrained_variant,
    recipe_for,
    resolved_cell_config,
    training_variant,
)
from .datasets import DatasetSpec, channel_stats, dataset_info, load_pool, split_images
from .dynamic import ExitScorer, MethodScorer, PosthocScorer
from .flops import baseline_cost, exit_flops
from .heldout import dataset_split, val_is_from_test
from .inference import keep_freed_memory, pick_device, prepare_for_inference, run_network
from .latency import BUDGET_COLUMNS, EXIT_COLUMNS, LatencyTask, measure_latency, select_budgets, thresholds_of
from .methods import METHODS, TrainContext, TrainingMethod
from .posthoc import POSTHOC
from .provenance import provenance
from .scored import ScoredOutputs
from .training import TrainData, load_weights, train

log = logging.getLogger("eebench")


# --- split and FLOPs -------------------------------------------------------------------------
def _pool(config: dict[str, Any], dataset: str):
    """The dataset's images, read by its format's reader (the split job, and the jobs that need
    the images themselves: train and infer)."""
    workers = config["data_workers"]
    if workers is None:  # this process's share of the job's cores (a SLURM allocation's), less its own
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's DDP processes on this node
        workers = max(0, len(os.sched_getaffinity(0)) // processes - 1)
    return load_pool(dataset_info(dataset, config), config["data_dir"], config["download"], workers)


def write_split(config: dict[str, Any], dataset: str, out: str) -> None:
    """The split's index arrays; for a declaration without mean/std also the normalisation,
    computed from the split's training images (``mean``, ``std``)."""
    spec = dataset_info(dataset, config)
    pool = _pool(config, dataset)
    split = dataset_split(config, dataset, (len(pool.train_labels), len(pool.test_labels)))
    if spec.mean is None:
        mean, std = channel_stats(split_images(pool, split, "train")[0])
        split["mean"], split["std"] = np.array(mean), np.array(std)
        log.info(
            "%s normalisation from the %d training images: mean %s, std %s",
            dataset,
            len(split["train"]),
            [round(m, 4) for m in mean],
            [round(s, 4) for s in std],
        )
    with io.atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **split)
    log.info("%s split: %s", dataset, {k: len(v) for k, v in split.items() if k in ("train", "val", "test")})


def normalisation(spec: DatasetSpec, split: dict[str, np.ndarray], path: str) -> tuple[tuple[float, ...], ...]:
    """(mean, std) per channel: the declaration's, or those its split computed."""
    if spec.mean is not None:
        return spec.mean, spec.std
    if "mean" not in split or "std" not in split or len(split["mean"]) != spec.input.channels:
        raise io.CorruptFileError(
            f"{path}: split file of {spec.key} (declared without mean/std) has no normalisation "
            f"for {spec.input.channels} channel(s); delete it to have it rebuilt"
        )
    return tuple(float(v) for v in split["mean"]), tuple(float(v) for v in split["std"])


def read_split(path: str) -> dict[str, np.ndarray]:
    data = io.load_tensors(path, what="split index file")
    missing = {"train", "val", "test"} - set(data)
    if missing:
        raise io.CorruptFileError(f"{path}: split index file lacks {sorted(missing)}; delete it to have it rebuilt")
    for key in ("train", "val", "test"):
        index = data[key]
        if (
            index.dim() != 1
            or index.is_floating_point()
            or index.dtype == torch.bool
            or (len(index) and int(index.min()) < 0)
        ):
            raise io.CorruptFileError(
                f"{path}: '{key}' must be a list of non-negative integer indices, got "
                f"{index.dtype} of shape {tuple(index.shape)}; delete it to have it rebuilt"
            )
    if not val_is_from_test(data) and np.intersect1d(data["train"].numpy(), data["val"].numpy()).size:
        raise io.CorruptFileError(f"{path}: train and val share images; delete it to have it rebuilt")
    return {k: v.numpy() for k, v in data.items()}


def _check_split_fits(split: dict[str, np.ndarray], pool: Any, path: str) -> None:
    test_size = len(pool.test_labels) or len(pool.train_labels)
    sizes = {
        "train": len(pool.train_labels),
        "val": test_size if val_is_from_test(split) else len(pool.train_labels),
        "test": test_size,
    }
    for key, size in sizes.items():
        if len(split[key]) and int(split[key].max()) >= size:
            raise io.CorruptFileError(
                f"{path}: '{key}' index {int(split[key].max())} is out of range for a pool "
                f"of {size} images (a split of another dataset?); delete it to have it rebuilt"
            )


def build_network(config: dict[str, Any], dataset: str, arch: str) -> MultiExitNetwork:
    family, params = architecture(config, arch)
    return build_model(family, dataset_info(dataset, config).input, **params)


def flops_record(network: MultiExitNetwork, input_spec: InputSpec, convention: str) -> dict[str, Any]:
    shape = (input_spec.channels, input_spec.size, input_spec.size)
    record: dict[str, Any] = {**exit_flops(network, shape, convention), "convention": convention}
    baseline = baseline_cost(network, shape, convention)
    if baseline is not None:
        record["baseline_flops"] = baseline
        record["cost_ratio"] = [f / baseline for f in record["flops"]]
    return record


def write_flops(config: dict[str, Any], dataset: str, arch: str, out: str) -> None:
    network = build_network(config, dataset, arch)
    record = flops_record(network, dataset_info(dataset, config).input, config["flops_convention"])
    table = config.get("report", {}).get("table1")
    if table is not None and (table["dataset"], table["architecture"]) == (dataset, arch):
        check_budgets(config, record["flops"])  # the first job that knows the FLOPs: fail before training
    io.write_json(out, record)
    log.info("%s/%s FLOPs per exit (M): %s", dataset, arch, [round(f / 1e6, 2) for f in record["flops"]])


def read_flops(path: str) -> dict[str, Any]:
    record = io.read_json(path)
    if not isinstance(record, dict) or "flops" not in record:
        raise io.CorruptFileError(f"{path}: expected a JSON object with a 'flops' list; delete it to have it rebuilt")
    flops = record["flops"]
    if (
        not isinstance(flops, list)
        or not flops
        or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in flops)
        or any(b < a for a, b in zip(flops, flops[1:]))
    ):
        raise io.CorruptFileError(
            f"{path}: 'flops' must be a non-empty, non-decreasing list of positive numbers "
            f"(cumulative FLOPs per exit), got {flops!r:.200}; delete it to have it rebuilt"
        )
    return record


def _load_state(network: torch.nn.Module, state: dict[str, Any], path: str) -> None:
    """Load weights into ``network``; weights of another architecture name the file, not torch internals."""
    try:
        network.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
        first = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])[:300] or type(err).__name__
        raise io.CorruptFileError(
            f"{path}: these weights do not fit {type(network).__name__} as configured "
            f"({first}); retrain or use the weights of this architecture"
        ) from None


# --- train -----------------------------------------------------------------------------------
def _train_data(config: dict[str, Any], dataset: str, split_path: str) -> TrainData:
    split = read_split(split_path)
    info = dataset_info(dataset, config)
    pool = _pool(config, dataset)
    _check_split_fits(split, pool, split_path)
    train_images, train_labels = split_images(pool, split, "train")
    val_images, val_labels = split_images(pool, split, "val")
    mean, std = normalisation(info, split, split_path)
    return TrainData(train_images, train_labels, val_images, val_labels, mean, std, info.crop_padding, info.hflip)


def _method_factory(config: dict[str, Any], variant: str):
    spec = training_variant(config, variant)
    cls = METHODS.get(spec["method"])
    params = METHODS.make_params(spec["method"], spec["params"], f"methods.{variant}.params")
    return lambda model, ctx: cls(model, params, ctx)


def _relative_exit_costs(flops: dict[str, Any]) -> torch.Tensor:
    f = torch.tensor(flops["flops"], dtype=torch.float32)
    return f / f[-1]


def train_cell(
    config: dict[str, Any],
    cell: Cell,
    split_path: str,
    flops_path: str,
    weights_out: str,
    history_out: str,
    state_dir: str,
    init_weights: str | None = None,
    stop_after_batches: int | None = None,
) -> None:
    keep_freed_memory()  # also helps training on CPU
    torch.manual_seed(cell.seed)
    network = build_network(config, cell.dataset, cell.arch)
    fingerprint = cell_fingerprint(config, cell)
    if init_weights is not None:
        parent = load_weights(init_weights, expect_fingerprint=cell_fingerprint(config, dependencies(config, cell)[0]))
        _load_state(network, parent["model"], init_weights)
        log.info("initialised from %s", init_weights)
    recipe = recipe_for(config, cell.dataset, cell.variant)
    device = pick_device(config["device"])
    data = _train_data(config, cell.dataset, split_path)
    flops = read_flops(flops_path)

    def report(row: dict[str, Any]) -> None:
        accs = " ".join(f"{v:.1f}" for k, v in row.items() if k.startswith("val_acc"))
        log.info(
            "epoch %d/%d loss %.4f lr %.4g val acc per exit: %s",
            row["epoch"],
            recipe.epochs,
            row["loss"],
            row["lr"],
            accs,
        )

    result = train(
        network,
        _method_factory(config, cell.variant),
        data,
        recipe,
        _relative_exit_costs(flops),
        dataset_info(cell.dataset, config).input.num_classes,
        cell.seed,
        state_dir,
        fingerprint,
        device,
        on_epoch=report,
        stop_after_batches=stop_after_batches,
    )
    if not distributed.current().is_main:  # [ddp] under torchrun process 0 writes the outputs
        return
    io.save_tensors(
        weights_out,
        {
            "model": {k: v.cpu() for k, v in result.model.state_dict().items()},
            "method": result.method.state_dict(),
            "fingerprint": fingerprint,
        },
    )
    io.write_csv(history_out, pd.DataFrame(result.history))


# --- convert (pretrained variants) -----------------------------------------------------------
def convert_cell(config: dict[str, Any], cell: Cell, flops_path: str, weights_out: str) -> None:
    """A pretrained variant's checkpoint as this cell's weights file, as ``train_cell`` writes it."""
    spec = pretrained_variant(config, cell.variant)
    family, params = architecture(config, cell.arch)
    checkpoint = spec["checkpoints"][cell.arch]
    info = dataset_info(cell.dataset, config)
    network, state = convert_checkpoint(checkpoint, spec["format"], family, info.input, params)
    ctx = TrainContext(
        exit_costs=_relative_exit_costs(read_flops(flops_path)),
        num_classes=info.input.num_classes,
        epochs=recipe_for(config, cell.dataset, cell.variant).epochs,
        steps_per_epoch=1,
    )
    method = _method_factory(config, cell.variant)(network, ctx)
    if method.extra_modules():
        raise io.CorruptFileError(
            f"config pretrained.{cell.variant}.method: {spec['method']!r} adds networks of its own "
            f"({', '.join(method.extra_modules())}) that no reference checkpoint holds; allowed: a method whose "
            "evaluation needs only the network (standard; boostnet for BoostNet's ensemble)"
        )
    io.save_tensors(
        weights_out,
        {
            "model": state,
            "method": method.state_dict(),
            "fingerprint": cell_fingerprint(config, cell),
            "source": {"checkpoint": str(checkpoint), "hash": content_hash(checkpoint), "format": spec["format"]},
        },
    )
    log.info("%s: converted %s (%s format, %d tensors)", cell.path, checkpoint, spec["format"], len(state))


# --- infer -----------------------------------------------------------------------------------
def inference_network(
    config: dict[str, Any], cell: Cell, weights: str, flops_path: str, device: torch.device
) -> tuple[MultiExitNetwork, TrainingMethod]:
    """A training cell's network prepared for inference (eval mode, BatchNorm folded,
    channels_last, on ``device``) and its method (for ``eval_outputs`` and the exit score)."""
    state = load_weights(weights, expect_fingerprint=cell_fingerprint(config, cell))
    network = build_network(config, cell.dataset, cell.arch)
    _load_state(network, state["model"], weights)
    prepare_for_inference(network, device)
    # the method is rebuilt only for eval_outputs, but with the run's real length: some methods
    # check their schedule against it (JEI-DNN's warm-up must be shorter than the run)
    ctx = TrainContext(
        exit_costs=_relative_exit_costs(read_flops(flops_path)),
        num_classes=dataset_info(cell.dataset, config).input.num_classes,
        epochs=recipe_for(config, cell.dataset, cell.variant).epochs,
        steps_per_epoch=1,
        device=device,
    )
    method = _method_factory(config, cell.variant)(network, ctx)
    method.load_state_dict(state["method"])
    return network, method


def infer_cell(
    config: dict[str, Any], cell: Cell, weights: str, split_path: str, flops_path: str, outs: dict[str, str]
) -> None:
    """Run the trained network once over each requested part into a cache."""
    keep_freed_memory()
    fingerprint = cell_fingerprint(config, cell)
    device = pick_device(config["device"])
    network, method = inference_network(config, cell, weights, flops_path, device)
    info = dataset_info(cell.dataset, config)
    split = read_split(split_path)
    mean, std = normalisation(info, split, split_path)
    pool = _pool(config, cell.dataset)
    batch = config["infer_batch_size"]
    for part, out in outs.items():
        images, labels = split_images(pool, split, part)
        split_size = len(labels)
        limit = config["train_cache_samples"] if part == "train" else None
        if limit is not None and len(labels) > limit:
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:limit].sort().values
            images, labels = images[keep], labels[keep]
        cache = run_network(
            network,
            images,
            mean,
            std,
            batch,
            device,
            channels_last=True,
            with_features=True,
            transform=method.eval_outputs,
        )
        cache["labels"] = labels
        cache["split_size"] = split_size  # the whole part's size, also when the cache holds a subsample
        cache["meta"] = {
            "fingerprint": fingerprint,
            "part": part,
            "split": io.file_hash(split_path),
            "format": CACHE_FORMAT,
        }
        io.save_tensors(out, cache)
        log.info("%s %s cache: %d samples, %d exits", cell.path, part, len(labels), cache["logits"].shape[0])


# --- post-hoc --------------------------------------------------------------------------------
def posthoc_cell(
    config: dict[str, Any],
    cell: Cell,
    flops_path: str,
    val_cache: str,
    test_cache: str,
    outs: dict[str, str],
    train_cache: str | None = None,
) -> None:
    spec = posthoc_variant(config, cell.variant)
    cls = POSTHOC.get(spec["method"])
    params = POSTHOC.make_params(spec["method"], spec["params"], f"posthoc.{cell.variant}.params")
    method = cls(params, read_flops(flops_path)["flops"], seed=cell.seed)
    base_fingerprint = _expected_meta(config, cell, "val")["fingerprint"]
    expect = {"fingerprint": base_fingerprint, "format": CACHE_FORMAT}
    val = load_cache(val_cache, {"part": "val", **expect})
    train_part = load_cache(train_cache, {"part": "train", **expect}) if train_cache else None
    method.fit(val, train_part)
    for part, path in (("val", val_cache), ("test", test_cache)):
        cache = val if part == "val" else load_cache(path, {"part": "test", **expect})
        scored = method.score(cache)
        record = {k: v for k, v in vars(scored).items() if v is not None}
        record["labels"] = cache["labels"]
        record["fitted"] = method.state_dict()
        record["meta"] = _expected_meta(config, cell, part)
        io.save_tensors(outs[part], record)


# --- evaluate --------------------------------------------------------------------------------
def _expected_meta(config: dict[str, Any], cell: Cell, part: str) -> dict[str, Any]:
    """What a cache (or post-hoc scores) of ``cell`` must record: the training cell's fingerprint,
    the part, and for post-hoc scores the post-hoc variant's settings."""
    if not is_posthoc(config, cell.variant):
        return {"part": part, "fingerprint": cell_fingerprint(config, cell), "format": CACHE_FORMAT}
    spec = posthoc_variant(config, cell.variant)
    base = Cell(cell.dataset, cell.arch, spec["base"], cell.seed)
    return {"part": part, "fingerprint": cell_fingerprint(config, base), "posthoc": io.stable_hash(spec)}


def _scored(config: dict[str, Any], cell: Cell, path: str, part: str) -> tuple[ScoredOutputs, torch.Tensor]:
    if is_posthoc(config, cell.variant):  # written by a post-hoc method
        data = io.load_tensors(path, what=f"{part} post-hoc scores")
        for key in ("scores", "predictions", "labels"):
            if key not in data:
                raise io.CorruptFileError(
                    f"{path}: post-hoc scores have no {key!r} entry (keys: {sorted(data)}); "
                    "delete it to have it rebuilt"
                )
        check_meta(path, data, _expected_meta(config, cell, part))
        fields = {
            k: data.get(k) for k in ("scores", "predictions", "probabilities", "exit_distributions", "budget_targets")
        }
        return ScoredOutputs(**fields), data["labels"].long()
    cache = load_cache(path, _expected_meta(config, cell, part))
    exit_score = METHODS.get(training_variant(config, cell.variant)["method"]).exit_score
    return scored_outputs(cache, exit_score), cache["labels"]


def _confidence_exit_threshold(config: dict[str, Any], cell: Cell, num_exits: int) -> float:
    variant = training_variant(config, cell.variant)
    params = METHODS.make_params(variant["method"], variant["params"], f"methods.{cell.variant}.params")
    return METHODS.get(variant["method"]).confidence_exit_threshold(params, num_exits)


def calibration_metrics(probabilities: torch.Tensor | None, labels: torch.Tensor, num_exits: int) -> pd.DataFrame:
    """Per exit: top-5 accuracy (percent), NLL (nats) and ECE (15 bins) of the class probabilities;
    nan when a cell has none."""
    if probabilities is None:
        return pd.DataFrame({"top5": [np.nan] * num_exits, "nll": np.nan, "ece": np.nan})
    probs = probabilities.float()
    return pd.DataFrame(
        {
            "top5": [metrics.top5(probs[k], labels) * 100 for k in range(num_exits)],
            "nll": [metrics.nll(probs[k], labels) for k in range(num_exits)],
            "ece": [metrics.ece(probs[k], labels, n_bins=bootstrap.ECE_BINS) for k in range(num_exits)],
        }
    )


def _add_intervals(frame: pd.DataFrame, columns: dict[str, np.ndarray]) -> None:
    for name, values in columns.items():
        if name not in frame:  # the calibration metrics come from eebench.metrics, only their intervals here
            frame[name] = values


def evaluate_cell(
    config: dict[str, Any],
    cell: Cell,
    val_path: str,
    test_path: str,
    flops_path: str,
    anytime_out: str,
    budgeted_out: str,
    provenance_out: str,
    samples_out: str | None = None,
) -> None:
    """The cell's curves with bootstrap intervals (``config['bootstrap']``), and its per-sample
    record (``samples_out``) from which seeds are aggregated and variants compared."""
    flops = read_flops(flops_path)
    val, _ = _scored(config, cell, val_path, "val")
    test, labels = _scored(config, cell, test_path, "test")
    for path, scored in ((val_path, val), (test_path, test)):
        exits = scored.predictions.shape[0]  # scores may carry a leading budget axis
        if exits != len(flops["flops"]):
            raise io.CorruptFileError(
                f"{path} has {exits} exits but {flops_path} has "
                f"{len(flops['flops'])}; delete the stale one to have it rebuilt"
            )
    correct = correctness(test, labels)
    curve = budgeted_curve(val.scores, test.scores, correct, flops["flops"], val.exit_distributions)
    budgeted = pd.DataFrame(curve.rows())
    if test.budget_targets is not None:
        budgeted["budget_target"] = test.budget_targets.numpy()
    anytime = pd.DataFrame(anytime_curve(correct, flops["flops"]))
    anytime = pd.concat([anytime, calibration_metrics(test.probabilities, labels, len(anytime))], axis=1)
    record = bootstrap.per_sample_record(correct, curve.exits, flops["flops"], test.probabilities, labels)
    settings = bootstrap.BootstrapSettings.from_config(config)
    values, replicates = bootstrap.cell_statistics(record, settings)
    for frame, curve_kind in ((anytime, "anytime"), (budgeted, "budgeted")):
        _add_intervals(frame, bootstrap.interval_columns(values, replicates, curve_kind, settings.level))
    test_cache = io.load_tensors(test_path, what="test cache")
    if "gates" in test_cache and "cost_ratio" in flops:
        threshold = _confidence_exit_threshold(config, cell, len(flops["flops"]))
        point = confidence_exit(test_cache["gates"].float(), correct, flops["cost_ratio"], threshold)
        anytime["confidence_exit_accuracy"] = point["accuracy"]
        anytime["confidence_exit_cost_ratio"] = point["cost_ratio"]
        anytime["confidence_exit_fraction"] = point["exit_fractions"]  # share of test images leaving at each exit
    if samples_out is not None:
        io.save_tensors(samples_out, record)
    io.write_csv(budgeted_out, budgeted)
    io.write_csv(anytime_out, anytime)
    io.write_json(provenance_out, provenance(resolved_cell_config(config, cell), config["device"]))
    best = budgeted["accuracy"].max()
    log.info("%s: last exit %.2f%%, best budgeted %.2f%%", cell.path, anytime["accuracy"].iloc[-1], best)


# --- latency ---------------------------------------------------------------------------------
def latency_cell(
    config: dict[str, Any],
    cell: Cell,
    weights: str,
    split_path: str,
    flops_path: str,
    budgeted_path: str,
    outs: dict[str, str],
    posthoc_path: str | None = None,
) -> None:
    """Time dynamic early exit of one cell at some of its budgets (``eebench.latency``), checking it
    against the simulated protocol; ``outs``: ``budgets`` and ``exits`` CSV paths. ``weights``
    are the training cell's (a post-hoc cell's base), ``posthoc_path`` a post-hoc cell's test scores."""
    keep_freed_memory()  # as infer_cell, whose inference this times
    spec = config["latency"]
    training_cell = dependencies(config, cell)[0] if is_posthoc(config, cell.variant) else cell
    device = pick_device(spec["device"])
    network, method = inference_network(config, training_cell, weights, flops_path, device)
    flops = read_flops(flops_path)["flops"]
    budgeted = pd.read_csv(budgeted_path)
    thresholds = thresholds_of(budgeted, network.num_exits, budgeted_path)
    chosen = select_budgets(budgeted, spec["budgets"])
    scorer_for = _latency_scorers(config, cell, method, flops, posthoc_path)
    images, labels = _latency_images(config, cell, split_path, spec["test_images"])
    normalised_by = normalisation(dataset_info(cell.dataset, config), read_split(split_path), split_path)
    budgets, exits = network_latency(
        network,
        scorer_for,
        normalised_by,
        images,
        labels,
        flops,
        {b: thresholds[b] for b in chosen},
        spec,
        device,
        config["infer_batch_size"],
        log=lambda line: log.info("%s %s", cell.path, line),
    )
    log.info(
        "%s: %s execution, %d ties at the threshold in %d checks",
        cell.path,
        budgets["execution"].iloc[0],
        int(budgets["ties"].sum()),
        int(budgets["checked_images"].sum()),
    )
    io.write_csv(outs["budgets"], budgets)
    io.write_csv(outs["exits"], exits)


def network_latency(
    network: MultiExitNetwork,
    scorer_for: Callable[[int], ExitScorer],
    normalised_by: tuple[tuple[float, ...], tuple[float, ...]],
    images: torch.Tensor,
    labels: torch.Tensor,
    flops: list[float],
    thresholds: dict[int, list[float]],
    spec: dict[str, Any],
    device: torch.device,
    infer_batch_size: int = 512,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(budget rows, per-exit rows) of a prepared network (``prepare_for_inference``) on uint8
    test ``images`` (normalised by ``(mean, std)``): the simulated protocol's scores as the cache gets
    them (``run_network``), then
    ``latency.measure_latency`` with the settings ``spec`` (the config's ``latency`` keys)."""
    probe = scorer_for(0)
    cache = run_network(
        network,
        images,
        *normalised_by,
        infer_batch_size,
        device,
        channels_last=True,
        with_features=probe.needs_features,
        transform=probe.transform,
    )
    mean, std = (torch.tensor(values, device=device) for values in normalised_by)
    prepared = normalize(images.to(device), mean, std).contiguous(memory_format=torch.channels_last)
    task = LatencyTask(network, scorer_for, prepared, labels, flops, probe.score_cache(cache), thresholds, device)
    budgets, exits = measure_latency(
        task, spec["batch_sizes"], spec["repeats"], spec["warmup"], spec["images"], spec["threads"], log=log
    )
    return budgets[BUDGET_COLUMNS], exits[EXIT_COLUMNS]


def _latency_scorers(
    config: dict[str, Any], cell: Cell, method: TrainingMethod, flops: list[float], posthoc_path: str | None
):
    """budget row -> the cell's exit scorer: its method's, or its post-hoc method's (fitted state
    read from the post-hoc scores) on the base method's outputs."""
    base = MethodScorer(method)
    if not is_posthoc(config, cell.variant):
        return lambda _row: base
    spec = posthoc_variant(config, cell.variant)
    posthoc = POSTHOC.get(spec["method"])(
        POSTHOC.make_params(spec["method"], spec["params"], f"posthoc.{cell.variant}.params"), flops, seed=cell.seed
    )
    data = io.load_tensors(posthoc_path, what="test post-hoc scores")
    check_meta(posthoc_path, data, _expected_meta(config, cell, "test"))
    if "fitted" not in data:
        raise io.CorruptFileError(
            f"{posthoc_path}: post-hoc scores have no 'fitted' state; delete it to have it rebuilt"
        )
    posthoc.load_state_dict(data["fitted"])

    def scorer(row: int) -> ExitScorer:
        return PosthocScorer(posthoc, row, base)

    return scorer


def _latency_images(
    config: dict[str, Any], cell: Cell, split_path: str, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` test images (all: None) as uint8 (N, C, H, W), and their labels."""
    split = read_split(split_path)
    pool = _pool(config, cell.dataset)
    _check_split_fits(split, pool, split_path)
    images, labels = split_images(pool, split, "test")
    if limit is not None:
        images, labels = images[torch.arange(min(limit, len(labels)))], labels[:limit]
    if isinstance(images, imagefolder.FolderImages):
        images = torch.cat([b.cpu() for b in imagefolder.eval_batches(images, 256, torch.device("cpu"))])
    return images, labels


# --- aggregate -------------------------------------------------------------------------------
def aggregate(
    config: dict[str, Any], cells: list[Cell], curve_files: list[str], provenance_files: list[str], out: str
) -> None:
    """One tidy table: identity columns, curve kind, budget, FLOPs, accuracy, provenance."""
    frames = []
    for cell, curve_path, prov_path in zip(cells, curve_files, provenance_files):
        frame = pd.read_csv(curve_path)
        prov = io.read_json(prov_path)
        kind = (
            "posthoc"
            if is_posthoc(config, cell.variant)
            else "pretrained"
            if is_pretrained(config, cell.variant)
            else "training"
        )
        method = (
            posthoc_variant(config, cell.variant) if kind == "posthoc" else training_variant(config, cell.variant)
        )["method"]
        frame.insert(0, "curve", Path(curve_path).stem)
        for i, (key, value) in enumerate(
            (
                ("dataset", cell.dataset),
                ("architecture", cell.arch),
                ("variant", cell.variant),
                ("method", method),
                ("kind", kind),
                ("seed", cell.seed),
            )
        ):
            frame.insert(i, key, value)
        frame["git_commit"] = prov["git_commit"]
        frame["device"] = prov["device"]
        frame["torch"] = prov["versions"]["torch"]
        frame["flops_convention"] = prov["config"]["flops_convention"]
        frames.append(frame)
    io.write_csv(out, pd.concat(frames, ignore_index=True))


def aggregate_summary(
    bootstrap_spec: dict[str, Any],
    cells: list[Cell],
    samples_files: list[str],
    aggregates: dict[str, str],
    outs: dict[str, str],
) -> None:
    """Seed means with two-level bootstrap intervals, per variant and exit or budget, from the
    cells' per-sample records; ``aggregates`` are the per-cell tables (identity columns)."""
    settings = bootstrap.BootstrapSettings(**bootstrap_spec)
    variants = summary.load_variants(cells, samples_files, settings)
    frames = summary.summary_tables(variants, pd.read_csv(aggregates["anytime"]), pd.read_csv(aggregates["budgeted"]))
    for kind, frame in zip(("anytime", "budgeted"), frames):
        io.write_csv(outs[kind], frame)
    log.info(
        "summaries of %d variants over %s seed(s), %d resamples",
        len(variants),
        sorted({len(v.seeds) for v in variants.values()}),
        settings.resamples,
    )
