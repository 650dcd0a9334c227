"""Command line: ``python -m eebench {list,flops,budgeted,check-config,timings}``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml


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
    from models import list_architectures

    from .methods import METHODS
    from .posthoc import POSTHOC

    listing = {"architectures": list_architectures(), "methods": METHODS.names(), "posthoc": POSTHOC.names()}
    if args.json:
        print(json.dumps(listing))
    else:
        for kind, names in listing.items():
            print(f"{kind}: {', '.join(names)}")


def cmd_flops(args: argparse.Namespace) -> None:
    from models import build_model, get_architecture

    from .config import ConfigError, load_config
    from .datasets import dataset_info
    from .pipeline import flops_record

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
    import pandas as pd

    from . import io
    from .cache import correctness, load_cache, scored_outputs
    from .calibration import budgeted_curve

    try:
        val, test = load_cache(args.val), load_cache(args.test)
        flops = io.read_json(args.flops)["flops"]
        if val["logits"].shape[0] != len(flops) or test["logits"].shape[0] != len(flops):
            raise ValueError(f"{args.flops} has {len(flops)} exits, the caches have "
                             f"{val['logits'].shape[0]} and {test['logits'].shape[0]}")
    except (OSError, ValueError, KeyError, io.CorruptFileError) as err:
        raise SystemExit(f"error: {err}") from None
    val_scored, test_scored = scored_outputs(val), scored_outputs(test)
    curve = budgeted_curve(val_scored.scores, test_scored.scores, correctness(test_scored, test["labels"]), flops)
    io.write_csv(args.out, pd.DataFrame(curve.rows()))
    print(f"wrote {len(curve.flops)} budgets to {args.out}")


def cmd_check_config(args: argparse.Namespace) -> None:
    """What the workflow checks at start (schema, registries, data), plus Table 1's budgets
    against its architecture's traced FLOPs (seconds; the workflow checks those once traced)."""
    from .config import ConfigError, check_budgets, check_config, check_data, load_config, validate_schema

    try:
        config = load_config(args.config)
        validate_schema(config)
        check_config(config)
        if not args.no_data:
            check_data(config)
        table = config.get("report", {}).get("table1")
        if table is not None and not args.no_flops:
            from .datasets import dataset_info
            from .pipeline import build_network, flops_record

            network = build_network(config, table["dataset"], table["architecture"])
            record = flops_record(network, dataset_info(table["dataset"], config).input, config["flops_convention"])
            check_budgets(config, record["flops"])
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{args.config}: ok")


def cmd_timings(args: argparse.Namespace) -> None:
    from .timings import format_table, rule_time_table

    table = rule_time_table(args.results)
    if args.csv:
        table.to_csv(sys.stdout, index=False)
    else:
        print(format_table(table))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eebench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered architectures, training and post-hoc methods")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("flops", help="per-exit cumulative FLOPs and parameters of an architecture")
    p.add_argument("arch")
    p.add_argument("dataset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture parameter; lists as 1-2-4 or [1, 2, 4]")
    p.add_argument("--convention", choices=("reference", "fvcore"), default="reference")
    p.add_argument("--config", help="a config whose datasets section declares or overrides the dataset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("budgeted", help="MSDNet budgeted-batch curve from two caches")
    p.add_argument("--val", required=True, help="val cache (.pt or .npz with logits, labels)")
    p.add_argument("--test", required=True, help="test cache")
    p.add_argument("--flops", required=True, help="FLOPs JSON as printed by the flops command")
    p.add_argument("--out", required=True, help="CSV to write")
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

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
