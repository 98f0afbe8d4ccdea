"""A picture of the zero-mean region: centered tensors, shifted tensors, folded and kept norms (DOT)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

STYLE = {
    "centered": ("palegreen", "ellipse"),
    "shifted": ("khaki", "ellipse"),
    "norm_folded": ("lightskyblue", "box"),
    "norm_kept": ("salmon", "box"),
}

LEGEND = "green: zero-mean once centered; yellow: shifted by centering; blue: folds to RMSNorm; red: stays LayerNorm"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: dict[str, Any], title: str = "") -> str:
    """DOT text for the region graph kept by the analysis (nodes: name -> op/module/status; edges)."""
    legend = LEGEND if not title else f"{title} ({LEGEND})"
    lines = [
        "digraph cbwc {",
        "  rankdir=TB; node [style=filled, fontname=Helvetica, fontsize=10];",
        f"  label={_quote(legend)}; labelloc=t;",
    ]
    for name, info in (graph or {}).get("nodes", {}).items():
        color, shape = STYLE.get(info["status"], ("white", "ellipse"))
        label = f"{info['op']}\\n{info['module']}" if info["module"] else info["op"]
        lines.append(f"  {_quote(name)} [label={_quote(label)}, fillcolor={color}, shape={shape}];")
    for src, dst in (graph or {}).get("edges", []):
        lines.append(f"  {_quote(src)} -> {_quote(dst)};")
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
