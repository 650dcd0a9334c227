"""One look per variant in every figure: colour, marker and line style, readable in grey-scale.

A variant's style depends only on its position in the config: first the variants the report's
figures list (in figure order), then the other training and post-hoc variants; so it is the same
in every figure of a run, and the first 10 variants drawn have 10 different colours. Colours
cycle through the 10 of matplotlib's ``tab10``, markers through 11 shapes and line styles
through 4: since 10 and 11 are coprime, no two of the first 110 variants share a colour and
marker. Architectures in one
panel differ by marker fill (filled, open, half-filled, ...). Plain values only (no matplotlib
import), so that the Snakefile can put them in a rule's params.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")
LINESTYLES = ("solid", "dashed", "dashdot", "dotted")
FILLS = ("full", "none", "left", "bottom", "right", "top")


@dataclass(frozen=True)
class VariantStyle:
    colour: str
    marker: str
    linestyle: str
    label: str

    def plot_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Axes.plot`` for this variant."""
        return {"color": self.colour, "marker": self.marker, "linestyle": self.linestyle}


def variant_names(config: dict[str, Any]) -> list[str]:
    """Every variant, those the figures list first (the order styles are given in)."""
    drawn = [v for spec in config["report"].get("figures", {}).values() for v in spec.get("variants", [])]
    return list(dict.fromkeys(drawn + all_variants(config)))


def all_variants(config: dict[str, Any]) -> list[str]:
    """Training, pretrained and post-hoc variants, in config order."""
    return [*config["methods"], *config["pretrained"], *config["posthoc"]]


def variant_label(config: dict[str, Any], variant: str) -> str:
    for section in ("methods", "pretrained", "posthoc"):
        if variant in config.get(section, {}):
            return config[section][variant].get("label", variant)
    return variant


def variant_styles(config: dict[str, Any]) -> dict[str, VariantStyle]:
    return {
        name: VariantStyle(
            COLOURS[i % len(COLOURS)],
            MARKERS[i % len(MARKERS)],
            LINESTYLES[i % len(LINESTYLES)],
            variant_label(config, name),
        )
        for i, name in enumerate(variant_names(config))
    }


def architecture_fills(config: dict[str, Any]) -> dict[str, str]:
    """Marker fill style of each architecture (``Line2D.set_fillstyle``)."""
    return {name: FILLS[i % len(FILLS)] for i, name in enumerate(config["architectures"])}


def styles_for(config: dict[str, Any]) -> dict[str, Any]:
    """Plain-data form of the styles (a rule parameter): ``variants`` name -> style fields,
    ``architectures`` name -> fill, ``flops_convention``."""
    return {
        "variants": {name: asdict(style) for name, style in variant_styles(config).items()},
        "architectures": architecture_fills(config),
        "flops_convention": config["flops_convention"],
    }


def styles_from(plain: dict[str, Any]) -> dict[str, VariantStyle]:
    return {name: VariantStyle(**fields) for name, fields in plain["variants"].items()}
