#!/usr/bin/env python
"""PROJECTION of a config's job times on this CPU, from short measured probes (nothing is trained
to the end).

For every training cell of the config (one seed) it measures, on the config's real data, one
thread per job as Snakemake gives a ``threads: 1`` job (``OMP_NUM_THREADS=1``):
* a training step of the cell's method on its network, batch size from its recipe: the median
  over ``--rounds`` rounds of each round's mean step (``--steps`` steps; a method that does extra
  work every few steps, as L2W's ``meta_interval``, is averaged over them), after ``--warmup``
  untimed steps. Rounds are
  interleaved over the cells (cell A's round, then B's, ..., then A again), so a change of machine
  load hits every cell alike.
* the network's inference per image (a val pass each epoch; the cache of val and test, and of the
  training split when a post-hoc method needs it), at the config's batch sizes;
* the post-hoc methods' fit and scoring on caches of that shape (from the untrained network: the
  cost does not depend on the weights);
* reading the dataset (the split, train and infer jobs each read it) and starting a job
  (importing the library in a fresh interpreter).
Every figure is the process's CPU time (one thread: what the job takes on a core of its own, the
figure that stays meaningful on a shared machine); wall time per step is printed beside it. A
training job is projected as epochs x (steps per epoch x step + val pass) + read + start; an
inference job as (images cached) x per-image cost + read + start. The whole run is bounded below
by the sum of the jobs over ``--cores`` and by its longest chain of dependent jobs.

    python benchmarks/cpu_projection.py config/fashion.yaml
    python benchmarks/cpu_projection.py config/fashion.yaml --steps 20 --rounds 3 --only msdnet
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

sys.path.insert(0, str(_bench.ROOT))
from eebench.augment import crop_flip, epoch_plan, normalize  # noqa: E402
from eebench.config import (  # noqa: E402
    cells,
    dependencies,
    is_posthoc,
    load_config,
    posthoc_variant,
    recipe_for,
    validate_schema,  # noqa: E402
)
from eebench.datasets import channel_stats, dataset_info, load_pool, make_split, split_images  # noqa: E402
from eebench.inference import keep_freed_memory, run_network  # noqa: E402
from eebench.methods import TrainContext  # noqa: E402
from eebench.pipeline import _method_factory, build_network, flops_record  # noqa: E402
from eebench.posthoc import POSTHOC  # noqa: E402
from eebench.training import make_optimizer  # noqa: E402


class Probe:
    """One training cell's network, method, optimizer and batches, ready to time steps."""

    def __init__(self, config: dict, cell, data: dict) -> None:
        self.cell = cell
        torch.manual_seed(0)
        self.network = build_network(config, cell.dataset, cell.arch)
        spec = data["spec"]
        self.flops = flops_record(self.network, spec.input, config["flops_convention"])["flops"]
        self.recipe = recipe_for(config, cell.dataset, cell.variant)
        self.steps_per_epoch = len(data["train_labels"]) // self.recipe.batch_size
        costs = torch.tensor(self.flops) / self.flops[-1]
        self.ctx = TrainContext(
            exit_costs=costs,
            num_classes=spec.input.num_classes,
            epochs=self.recipe.epochs,
            steps_per_epoch=self.steps_per_epoch,
            lr=self.recipe.lr,
            momentum=self.recipe.momentum,
            weight_decay=self.recipe.weight_decay,
        )
        self.method = _method_factory(config, cell.variant)(self.network, self.ctx)
        self.optimizer = make_optimizer(self.recipe, list(self.method.trainable_parameters()))
        self.data, self.spec = data, spec
        # the real loop's batches: crop/flip plan, normalisation; a step index past any warm-up
        self.plan = epoch_plan(len(data["train_labels"]), spec.crop_padding, 0, 0)
        self.step = self.recipe.epochs * self.steps_per_epoch // 2
        self.times: list[float] = []  # CPU seconds per step, one mean per round
        self.wall: list[float] = []

    def run(self, steps: int, timed: bool) -> None:
        self.network.train()
        b = self.recipe.batch_size
        cpu = wall = 0.0
        for _ in range(steps):
            start = (self.step * b) % (len(self.plan.order) - b)
            idx = self.plan.order[start : start + b]
            flips = self.plan.flips[idx] if self.spec.hflip else torch.zeros(b, dtype=torch.bool)
            images = crop_flip(self.data["train_images"][idx], self.plan.offsets[idx], flips, self.spec.crop_padding)
            x = normalize(images, self.data["mean"], self.data["std"])
            t, w = time.process_time(), time.perf_counter()
            for group in self.optimizer.param_groups if self.optimizer else []:
                group["lr"] = self.recipe.lr_at(self.step, self.ctx.total_steps, self.steps_per_epoch)
            self.method.train_step(x, self.data["train_labels"][idx], self.optimizer, self.step)
            cpu, wall = cpu + time.process_time() - t, wall + time.perf_counter() - w
            self.step += 1
        if timed:
            self.times.append(cpu / steps)
            self.wall.append(wall / steps)


def dataset_data(config: dict, name: str) -> dict:
    spec = dataset_info(name, config)
    t = time.process_time()
    pool = load_pool(spec, config["data_dir"], workers=0)
    read_s = time.process_time() - t
    split = make_split(spec, (len(pool.train_labels), len(pool.test_labels)), config["split_seed"])
    train_images, train_labels = split_images(pool, split, "train")
    if spec.mean is None:
        mean, std = channel_stats(train_images)
    else:
        mean, std = spec.mean, spec.std
    return {
        "spec": spec,
        "read_s": read_s,
        "train_images": train_images,
        "train_labels": train_labels,
        "val": split_images(pool, split, "val"),
        "test": split_images(pool, split, "test"),
        "mean": torch.tensor(mean),
        "std": torch.tensor(std),
        "split": split,
    }


def per_image_inference(probe: Probe, config: dict, images: torch.Tensor, batch: int) -> float:
    probe.network.eval()
    t = time.process_time()
    run_network(
        probe.network,
        images,
        tuple(probe.data["mean"].tolist()),
        tuple(probe.data["std"].tolist()),
        batch,
        torch.device("cpu"),
        with_features=False,
    )
    return (time.process_time() - t) / len(images)


def needs_train_cache(config: dict, cell, base) -> bool:
    """Whether post-hoc cell ``cell`` fits on the training-split cache of training cell ``base``."""
    if not is_posthoc(config, cell.variant) or cell.arch != base.arch:
        return False
    spec = posthoc_variant(config, cell.variant)
    return spec["base"] == base.variant and POSTHOC.get(spec["method"]).needs_train_split


def start_up_seconds() -> float:
    """A job's fixed cost: a fresh interpreter importing what the train and infer jobs import."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import eebench.pipeline, eebench.smk"], check=True, cwd=_bench.ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round and cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--only", help="only cells of this architecture")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what a threads: 1 Snakemake job gets
    keep_freed_memory()
    config = load_config(args.config)
    validate_schema(config)
    print(f"# {_bench.machine_line()}")
    all_cells = [c for c in cells(config) if c.seed == config["seeds"][0]]
    train_cells = [
        c for c in all_cells if not is_posthoc(config, c.variant) and (args.only is None or c.arch == args.only)
    ]
    datasets = {name: dataset_data(config, name) for name in sorted({c.dataset for c in train_cells})}
    probes = [Probe(config, c, datasets[c.dataset]) for c in train_cells]
    for probe in probes:
        probe.run(args.warmup, timed=False)
    for r in range(args.rounds):
        for probe in probes if r % 2 == 0 else probes[::-1]:
            probe.run(args.steps, timed=True)
        print(f"# round {r + 1}/{args.rounds} done, {_bench.load_average()}", flush=True)
    start_s = statistics.median(start_up_seconds() for _ in range(3))
    infer_batch = config.get("infer_batch_size", 512)
    jobs: dict[str, float] = {}
    print(
        f"\n{'cell':52} {'cpu ms/step':>11} {'wall':>6} {'steps/ep':>8} {'val s/ep':>8} {'train s':>8} {'infer s':>8}"
    )
    for probe in probes:
        data = probe.data
        step_s = statistics.median(probe.times)
        val_s = per_image_inference(probe, config, data["val"][0][:1024], probe.recipe.eval_batch_size) * len(
            data["val"][1]
        )
        train_s = probe.recipe.epochs * (probe.steps_per_epoch * step_s + val_s) + data["read_s"] + start_s
        cached = len(data["val"][1]) + len(data["test"][1])
        if any(needs_train_cache(config, c, probe.cell) for c in all_cells):
            n_train = len(data["train_labels"])
            cached += min(n_train, config.get("train_cache_samples") or n_train)
        per_image = per_image_inference(probe, config, data["test"][0][:2048], infer_batch)
        infer_s = per_image * cached + data["read_s"] + start_s
        jobs[f"train {probe.cell.path}"] = train_s
        jobs[f"infer {probe.cell.path}"] = infer_s
        print(
            f"{probe.cell.path:52} {step_s * 1e3:11.1f} {statistics.median(probe.wall) * 1e3:6.0f} "
            f"{probe.steps_per_epoch:8d} {val_s:8.1f} {train_s:8.0f} {infer_s:8.0f}",
            flush=True,
        )
    for cell in all_cells:  # post-hoc fits on caches of the right shape
        if not is_posthoc(config, cell.variant) or (args.only and cell.arch != args.only):
            continue
        spec = posthoc_variant(config, cell.variant)
        base = next(p for p in probes if (p.cell.arch, p.cell.variant) == (cell.arch, spec["base"]))
        caches = {}
        method = POSTHOC.get(spec["method"])(
            POSTHOC.make_params(spec["method"], spec.get("params", {})), base.flops, seed=0
        )
        parts = [("val", base.data["val"]), ("test", base.data["test"])]
        if method.needs_train_split:
            n = min(len(base.data["train_labels"]), config.get("train_cache_samples") or len(base.data["train_labels"]))
            parts.append(("train", (base.data["train_images"][:n], base.data["train_labels"][:n])))
        for part, (images, labels) in parts:
            cache = run_network(
                base.network,
                images,
                tuple(base.data["mean"].tolist()),
                tuple(base.data["std"].tolist()),
                infer_batch,
                torch.device("cpu"),
            )
            cache["labels"] = labels
            caches[part] = cache
        t = time.process_time()
        method.fit(caches["val"], caches.get("train"))
        method.score(caches["val"])
        method.score(caches["test"])
        jobs[f"posthoc {cell.path}"] = time.process_time() - t + start_s
        print(f"{cell.path:52} post-hoc fit + score {jobs[f'posthoc {cell.path}']:.0f} s")
    n_evaluate = len(all_cells)
    small = n_evaluate * (start_s + 1.0) + len(datasets) * (start_s + max(d["read_s"] for d in datasets.values()))
    total = sum(jobs.values()) + small
    chains = {}
    for probe in probes:
        chain = [probe.cell, *dependencies(config, probe.cell)]
        chains[probe.cell.path] = sum(jobs[f"train {c.path}"] for c in chain) + jobs[f"infer {probe.cell.path}"]
    longest = max(chains, key=chains.get)
    print(
        f"\njob start-up {start_s:.1f} s; {len(jobs)} train/infer/posthoc jobs {sum(jobs.values()):.0f} s, "
        f"split/evaluate/report jobs about {small:.0f} s"
    )
    print(
        f"PROJECTION on {args.cores} cores: at least {total / args.cores / 60:.1f} min (all jobs / cores); "
        f"longest chain {chains[longest] / 60:.1f} min ({longest})"
    )


if __name__ == "__main__":
    main()
