"""Command line: ``python -m eebench {list,flops,budgeted,check-config,timings,convert-checkpoint,logits,
latency}``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pandas as pd
import torch
import yaml

from models import build_model, get_architecture, list_architectures

from . import io
from .bootstrap import BootstrapSettings, cell_statistics, interval_columns
from .cache import correctness, load_cache, scored_outputs
from .calibration import budgeted_curve
from .checkpoints import FORMATS, convert_checkpoint, load_weights_only
from .config import (
    ConfigError,
    check_budgets,
    check_config,
    check_data,
    content_hash,
    load_config,
    pretrained_fingerprint,
    validate_schema,
)
from .datasets import dataset_info, load_pool, make_split, split_images
from .dynamic import MethodScorer
from .inference import pick_device, prepare_for_inference
from .latency import select_budgets, thresholds_of
from .methods import METHODS, TrainContext
from .pipeline import _load_state, build_network, flops_record, network_latency, normalisation, read_split
from .posthoc import POSTHOC
from .timings import format_table, rule_time_table
from .training import load_weights

CHECKPOINT_FORMATS = tuple(FORMATS)


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML (``[1, 2, 4]``, ``true``, ``0.5``) or a reference-style dash list
    (``1-2-4-4``)."""
    parts = text.split("-")
    if len(parts) > 1 and all(p.isdigit() for p in parts):
        return [int(p) for p in parts]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def cmd_list(args: argparse.Namespace) -> None:

    listing = {"architectures": list_architectures(), "methods": METHODS.names(), "posthoc": POSTHOC.names()}
    if args.json:
        print(json.dumps(listing))
    else:
        for kind, names in listing.items():
            print(f"{kind}: {', '.join(names)}")


def cmd_flops(args: argparse.Namespace) -> None:

    try:
        get_architecture(args.arch)
        config = load_config(args.config) if args.config else None
        info = dataset_info(args.dataset, config)
        network = build_model(args.arch, info.input, **parse_sets(args.set))
        record = flops_record(network, info.input, args.convention)
    except (KeyError, ValueError, TypeError, ConfigError) as err:
        raise SystemExit(f"error: {err.args[0] if err.args else err}") from None
    if args.json:
        print(json.dumps(record))
        return
    print(f"{args.arch} on {args.dataset} ({args.convention} convention)")
    for k, (f, p) in enumerate(zip(record["flops"], record["params"]), start=1):
        ratio = f"  cost ratio {record['cost_ratio'][k - 1]:.3f}" if "cost_ratio" in record else ""
        print(f"exit {k}: {f / 1e6:10.2f} MFLOPs  {p / 1e6:8.3f} M params{ratio}")


def cmd_budgeted(args: argparse.Namespace) -> None:

    try:
        val, test = load_cache(args.val), load_cache(args.test)
        flops = io.read_json(args.flops)["flops"]
        if val["logits"].shape[0] != len(flops) or test["logits"].shape[0] != len(flops):
            raise ValueError(
                f"{args.flops} has {len(flops)} exits, the caches have "
                f"{val['logits'].shape[0]} and {test['logits'].shape[0]}"
            )
    except (OSError, ValueError, KeyError, io.CorruptFileError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.bootstrap < 0 or not 0 < args.level < 1:
        raise SystemExit(
            f"error: --bootstrap must be >= 0 and --level between 0 and 1, got {args.bootstrap} and {args.level}"
        )
    val_scored, test_scored = scored_outputs(val), scored_outputs(test)
    correct = correctness(test_scored, test["labels"])
    curve = budgeted_curve(val_scored.scores, test_scored.scores, correct, flops)
    table = pd.DataFrame(curve.rows())
    if args.bootstrap:
        settings = BootstrapSettings(resamples=args.bootstrap, seed=args.bootstrap_seed, level=args.level)
        record = {"correct": correct, "exits": curve.exits, "flops": torch.as_tensor(flops, dtype=torch.float64)}
        point, replicates = cell_statistics(record, settings)
        for name, values in interval_columns(point, replicates, "budgeted", settings.level).items():
            table[name] = values
    io.write_csv(args.out, table)
    print(
        f"wrote {len(curve.flops)} budgets to {args.out}"
        + (f" with {args.level:.0%} bootstrap intervals ({args.bootstrap} resamples)" if args.bootstrap else "")
    )


def cmd_check_config(args: argparse.Namespace) -> None:
    """What the workflow checks at start (schema, registries, data), plus Table 1's budgets
    against its architecture's traced FLOPs (seconds; the workflow checks those once traced)."""

    try:
        config = load_config(args.config)
        validate_schema(config)
        check_config(config)
        if not args.no_data:
            check_data(config)
        table = config["report"].get("table1")
        if table is not None and not args.no_flops:
            network = build_network(config, table["dataset"], table["architecture"])
            record = flops_record(network, dataset_info(table["dataset"], config).input, config["flops_convention"])
            check_budgets(config, record["flops"])
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{args.config}: ok")


def cmd_timings(args: argparse.Namespace) -> None:

    table = rule_time_table(args.results)
    if args.csv:
        table.to_csv(sys.stdout, index=False)
    else:
        print(format_table(table))


def _network_for(family: str, dataset: str, sets: list[str]):

    get_architecture(family)  # an unknown family is named with the allowed ones
    info = dataset_info(dataset)
    params = parse_sets(sets)
    return build_model(family, info.input, **params), params, info


def cmd_convert_checkpoint(args: argparse.Namespace) -> None:
    """A reference checkpoint as a weights file of this harness (what the train rule writes)."""
    try:
        _, params, info = _network_for(args.arch, args.dataset, args.set)
        _, state = convert_checkpoint(args.src, args.fmt, args.arch, info.input, params)
    except (KeyError, ValueError, TypeError, OSError, io.CorruptFileError) as err:
        raise SystemExit(f"error: {err.args[0] if err.args else err}") from None
    checkpoint_hash = content_hash(args.src)
    io.save_tensors(
        args.out,
        {
            "model": state,
            "method": {},
            "fingerprint": pretrained_fingerprint(args.dataset, args.arch, params, args.fmt, checkpoint_hash),
            "source": {"checkpoint": args.src, "hash": checkpoint_hash, "format": args.fmt},
        },
    )
    print(f"wrote {args.out}: {len(state)} tensors of {args.arch} for {args.dataset}, from {args.src} ({args.fmt})")


def cmd_logits(args: argparse.Namespace) -> None:
    """Per-exit logits (K, N, C) in eval mode of a weights file on saved, normalised images."""

    try:
        network, _, info = _network_for(args.arch, args.dataset, args.set)
        _load_state(network, load_weights(args.weights)["model"], args.weights)
        images = load_weights_only(args.input)
        if isinstance(images, dict):
            images = images.get("images")
        spec = info.input
        if (
            not isinstance(images, torch.Tensor)
            or not images.is_floating_point()
            or images.dim() != 4
            or tuple(images.shape[1:]) != (spec.channels, spec.size, spec.size)
        ):
            shown = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"{args.input}: expected a float tensor of normalised images (N, {spec.channels}, "
                f"{spec.size}, {spec.size}) (or a dict with it under 'images'), got {shown}"
            )
    except (KeyError, ValueError, TypeError, OSError, io.CorruptFileError) as err:
        raise SystemExit(f"error: {err.args[0] if err.args else err}") from None
    network.eval()
    logits, gates = [], []
    with torch.no_grad():
        for batch in images.float().split(args.batch_size):
            out = network.forward_all(batch)
            logits.append(torch.stack(out.logits))
            if out.gates is not None:
                gates.append(torch.stack(out.gates))
    record = {"logits": torch.cat(logits, dim=1)}
    if gates:
        record["gates"] = torch.cat(gates, dim=1)
    io.save_tensors(args.out, record)
    k, n, c = record["logits"].shape
    print(f"wrote {args.out}: logits of {k} exits x {n} images x {c} classes")


def cmd_latency(args: argparse.Namespace) -> None:
    """Dynamic early exit of a trained network timed at the thresholds of a budgeted curve."""

    try:
        network, _, info = _network_for(args.arch, args.dataset, args.set)
        state = io.load_tensors(args.weights, what="weights")
        _load_state(network, state.get("model", state), args.weights)
        flops = flops_record(network, info.input, args.convention)["flops"]
        curve = pd.read_csv(args.thresholds)
        thresholds = thresholds_of(curve, network.num_exits, args.thresholds)
        chosen = list(thresholds) if args.budgets is None else select_budgets(curve, args.budgets)
        device = pick_device(args.device)
        prepare_for_inference(network, device)
        # rebuilt for eval_outputs and the exit score only; a long run passes every schedule check
        ctx = TrainContext(
            exit_costs=torch.tensor(flops) / flops[-1],
            num_classes=info.input.num_classes,
            epochs=10**6,
            steps_per_epoch=1,
            device=device,
        )
        method = METHODS.get(args.method)(network, METHODS.make_params(args.method, parse_sets(args.method_set)), ctx)
        if method.extra_modules() and "method" not in state:
            raise ValueError(
                f"{args.weights}: method {args.method!r} needs its trained state (a 'method' entry, as "
                "the workflow's weights.pt has), which this file lacks"
            )
        method.load_state_dict(state.get("method", {}))
        pool = load_pool(info, args.data_dir)
        split = (
            read_split(args.split)
            if args.split
            else make_split(info, (len(pool.train_labels), len(pool.test_labels)), args.split_seed)
        )
        images, labels = split_images(pool, split, "test")
        if args.test_images is not None:
            images, labels = images[: args.test_images], labels[: args.test_images]
        spec = {
            "batch_sizes": args.batch_size,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "images": args.images,
            "threads": args.threads,
        }
        scorer = MethodScorer(method)
        budgets, exits = network_latency(
            network,
            lambda _row: scorer,
            normalisation(info, split, args.split or "the split"),
            images,
            labels,
            flops,
            {b: thresholds[b] for b in chosen},
            spec,
            device,
            log=print,
        )
    except (KeyError, ValueError, TypeError, OSError, io.CorruptFileError) as err:
        raise SystemExit(f"error: {err.args[0] if err.args else err}") from None
    columns = [
        "budget_id",
        "batch_size",
        "flops",
        "accuracy",
        "ms_per_image",
        "ms_ci_low",
        "ms_ci_high",
        "speedup_measured",
        "speedup_flops",
        "ties",
    ]
    print(budgets[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(
        f"device {budgets['device'].iloc[0]}, {budgets['threads'].iloc[0]} thread(s), median of {args.repeats} "
        f"rounds, interval coverage {budgets['ci_level'].min():.1%}, {budgets['execution'].iloc[0]} execution"
    )
    if args.out:
        io.write_csv(args.out, budgets)
    if args.exits_out:
        io.write_csv(args.exits_out, exits)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eebench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered architectures, training and post-hoc methods")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("flops", help="per-exit cumulative FLOPs and parameters of an architecture")
    p.add_argument("arch")
    p.add_argument("dataset")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture parameter; lists as 1-2-4 or [1, 2, 4]",
    )
    p.add_argument("--convention", choices=("reference", "fvcore"), default="reference")
    p.add_argument("--config", help="a config whose datasets section declares or overrides the dataset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("budgeted", help="MSDNet budgeted-batch curve from two caches")
    p.add_argument("--val", required=True, help="val cache (.pt or .npz with logits, labels)")
    p.add_argument("--test", required=True, help="test cache")
    p.add_argument("--flops", required=True, help="FLOPs JSON as printed by the flops command")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="add accuracy_ci_low/high and flops_ci_low/high from N bootstrap resamples of the test set",
    )
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resampled test indices")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.set_defaults(func=cmd_budgeted)

    p = sub.add_parser("check-config", help="validate a config: schema, registries, data, Table 1 budgets")
    p.add_argument("config")
    p.add_argument("--no-data", action="store_true", help="do not check that the datasets are in data_dir")
    p.add_argument("--no-flops", action="store_true", help="do not trace FLOPs to check Table 1's budgets")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("timings", help="per-rule time table of a run, from its Snakemake benchmark files")
    p.add_argument("results", nargs="?", default="results", help="the run's results directory")
    p.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_timings)

    p = sub.add_parser(
        "convert-checkpoint", help="a checkpoint of the reference code as a weights file of this harness"
    )
    p.add_argument("src", help="the checkpoint file the reference's training script saved")
    p.add_argument(
        "--from",
        dest="fmt",
        required=True,
        choices=CHECKPOINT_FORMATS,
        help="the repository that wrote it: msdnet (kalviny/MSDNet-PyTorch), l2w (LeapLabTHU/L2W-DEN), "
        "ranet (yangle15/RANet-pytorch), boostnet (SHI-Labs/Boosted-Dynamic-Networks), "
        "eenets (eksuas/eenets.pytorch)",
    )
    p.add_argument("--arch", required=True, help="architecture family of this harness (msdnet, ranet, ee_resnet)")
    p.add_argument("--dataset", required=True, help="the dataset it was trained on (input size and classes)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture parameter, as in the config; lists as 1-2-4 or [1, 2, 4]",
    )
    p.add_argument("--out", required=True, help="weights file to write")
    p.set_defaults(func=cmd_convert_checkpoint)

    p = sub.add_parser("logits", help="per-exit logits (K, N, C) in eval mode of a weights file on saved images")
    p.add_argument("weights", help="a weights file (convert-checkpoint's or the train rule's)")
    p.add_argument("--arch", required=True, help="architecture family")
    p.add_argument("--dataset", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="architecture parameter")
    p.add_argument("--input", required=True, help="torch.save'd float tensor (N, C, H, W) of normalised images")
    p.add_argument("--out", required=True, help="file to write: {'logits': (K, N, C)[, 'gates': (K, N)]}")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("latency", help="time dynamic early exit of a trained network at a budgeted curve's thresholds")
    p.add_argument("--weights", required=True, help="weights.pt of the workflow, or a plain state dict")
    p.add_argument("--arch", required=True, help="architecture family (python -m eebench list)")
    p.add_argument("--dataset", required=True, help="dataset the network was trained on (its test split is timed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="architecture parameter")
    p.add_argument(
        "--thresholds",
        required=True,
        help="budgeted curve CSV with budget_id and threshold_1..K (results/curves/.../budgeted.csv)",
    )
    p.add_argument("--batch-size", type=int, action="append", required=True, help="repeat for several")
    p.add_argument(
        "--budgets",
        type=int,
        default=None,
        help="time this many budgets spread over the curve's FLOPs (default: every row)",
    )
    p.add_argument("--method", default="standard", help="training method (eval_outputs, exit score)")
    p.add_argument("--method-set", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--images", type=int, default=64, help="test images timed per pass (at least one batch)")
    p.add_argument("--test-images", type=int, default=None, help="test images checked (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--split", default=None, help="split index file (default: the split of --split-seed)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--convention", choices=("reference", "fvcore"), default="reference")
    p.add_argument("--out", default=None, help="CSV of the budget rows")
    p.add_argument("--exits-out", default=None, help="CSV of the per-exit cumulative latency")
    p.set_defaults(func=cmd_latency)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
