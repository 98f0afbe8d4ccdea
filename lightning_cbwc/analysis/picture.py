"""A picture of a fold plan (DOT): which norms fold, what writes into them, what keeps the others.

One node per norm site (blue: folds to RMSNorm; red: stays LayerNorm, the reason as its label's second line
and as an SVG tooltip) and one per writer module (green; its weight and bias share the node), grouped by
block (the module path up to its first index, ``blocks.3``).  A writer points at the first site that needs
it: the later ones inherit it through the residual stream, so a 12-block model stays readable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

LEGEND = "blue: folds to RMSNorm; red: stays LayerNorm (why); green: writers centered for it"
_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")


def _quote(s: str) -> str:
    """A DOT string: quotes and backslashes escaped, newlines as DOT's \\n."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _block(path: str) -> str:
    m = _BLOCK.match(path)
    return m.group(1) if m else ""


def _writer_node(param: str, module: str) -> str:
    return module or param.rpartition(".")[0] or param


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def to_dot(plan: Any, title: str = "") -> str:
    """DOT text for ``plan`` (a :class:`~lightning_cbwc.FoldPlan`)."""
    legend = LEGEND if not title else f"{title} ({LEGEND})"
    clusters: dict[str, list[str]] = {}
    lines = [
        "digraph cbwc {",
        "  rankdir=LR; newrank=true; node [style=filled, fontname=Helvetica, fontsize=10];",
        f"  label={_quote(legend)}; labelloc=t;",
    ]
    first_site: dict[str, str] = {}
    for site in plan.sites:
        if site.foldable:
            label, color, tip = f"{site.name}\nfolds", "lightskyblue", site.writers_summary(limit=6)
        else:
            label, color, tip = f"{site.name}\n{_short(site.reason or '')}", "salmon", site.reason or ""
        node = f"site:{site.name}"
        clusters.setdefault(_block(site.name), []).append(
            f"{_quote(node)} [label={_quote(label)}, fillcolor={color}, shape=box, tooltip={_quote(tip)}];"
        )
        for w in site.writers:
            first_site.setdefault(_writer_node(w.param, w.module), node)
    kinds: dict[str, set[str]] = {}
    for site in plan.sites:
        for w in site.writers:
            kinds.setdefault(_writer_node(w.param, w.module), set()).add(w.param.rpartition(".")[2])
    for name, attrs in kinds.items():
        label = f"{name}\n{', '.join(sorted(attrs))}"
        clusters.setdefault(_block(name), []).append(
            f"{_quote('w:' + name)} [label={_quote(label)}, fillcolor=palegreen, shape=ellipse];"
        )
    for block, nodes in clusters.items():
        if block:
            lines.append(f"  subgraph {_quote('cluster_' + block)} {{ label={_quote(block)}; color=gray;")
            lines += [f"    {n}" for n in nodes]
            lines.append("  }")
        else:
            lines += [f"  {n}" for n in nodes]
    for name, node in first_site.items():
        lines.append(f"  {_quote('w:' + name)} -> {_quote(node)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def save_picture(dot: str, path: str | Path) -> Path:
    """Write ``dot`` to ``path``: .svg/.png rendered by graphviz when ``dot`` is installed, else .dot text.

    Returns the path written (the suffix becomes .dot when graphviz is missing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower()
    if fmt in ("svg", "png", "pdf") and shutil.which("dot"):
        subprocess.run(["dot", f"-T{fmt}", "-o", str(path)], input=dot.encode(), check=True)
        return path
    out = path.with_suffix(".dot")
    out.write_text(dot)
    return out
