"""The result of the analysis: which normalizations fold, why the others don't, and what to center."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Writer:
    """One parameter to center so that a folded norm's input becomes zero-mean.

    ``param`` is the parameter (or buffer) qualified name and ``dim`` the dim of that tensor to center over
    (its output dim).  ``kind`` says how it writes into the stream: linear, conv1d (HF GPT-2, weight (in, out)),
    conv, embedding, embedding_lookup (centered at the lookup because the table is tied elsewhere), parameter
    (added straight into the stream).  ``scale`` names a LayerScale parameter folded into this writer first.
    """

    param: str
    dim: int
    kind: str
    module: str = ""
    scale: str | None = None


@dataclass
class NormSite:
    """One normalization module of the model and the verdict on it.

    ``foldable``: exact (its input is zero-mean once ``writers`` are centered).  ``approximate``: not exact
    (``reason`` says why) but swapped for RMSNorm all the same, by ``convert(..., replace="all")``.
    """

    name: str
    kind: str
    normalized_shape: tuple[int, ...]
    foldable: bool
    reason: str | None = None
    writers: list[Writer] = field(default_factory=list)
    module_type: str = ""
    #: other qualified names of the same module (one module registered under several names)
    aliases: list[str] = field(default_factory=list)
    approximate: bool = False
    #: where the normalized dims are: "channels_last" (trailing dims) or "channels_first" (dim 1)
    layout: str = "channels_last"

    @property
    def verdict(self) -> str:
        """``"exact"``, ``"approximate"`` (swapped anyway) or ``"kept"`` (stays LayerNorm)."""
        return "exact" if self.foldable else "approximate" if self.approximate else "kept"

    def writers_summary(self, limit: int = 3) -> str:
        """'N writers: a[dim 0], b[dim 0], ...' with the newest (closest to the norm) first."""
        names = [f"{w.param}[dim {w.dim}]" for w in reversed(self.writers)]
        more = f", ... (+{len(names) - limit})" if len(names) > limit else ""
        return f"{len(names)} writers: " + ", ".join(names[:limit]) + more


@dataclass
class FoldPlan:
    """Every normalization the captured graph runs, with the writers that make the foldable ones exact."""

    sites: list[NormSite]
    model_type: str = ""

    @property
    def foldable(self) -> list[NormSite]:
        return [s for s in self.sites if s.foldable]

    @property
    def not_foldable(self) -> list[NormSite]:
        return [s for s in self.sites if not s.foldable]

    @property
    def approximate(self) -> list[NormSite]:
        return [s for s in self.sites if s.approximate]

    @property
    def swapped(self) -> list[NormSite]:
        """The sites that become RMSNorm: the foldable ones and, with ``replace="all"``, the approximate ones."""
        return [s for s in self.sites if s.foldable or s.approximate]

    @property
    def kept(self) -> list[NormSite]:
        """The sites that stay LayerNorm."""
        return [s for s in self.sites if not (s.foldable or s.approximate)]

    @property
    def writers(self) -> list[Writer]:
        """The writers of all swapped sites, each once, in a stable order."""
        seen: dict[tuple[str, int, str], Writer] = {}
        for site in self.swapped:
            for w in site.writers:
                seen.setdefault((w.param, w.dim, w.kind), w)
        return list(seen.values())

    def __getitem__(self, name: str) -> NormSite:
        for site in self.sites:
            if site.name == name or name in site.aliases:
                return site
        raise KeyError(f"no normalization named {name!r}; sites: {[s.name for s in self.sites]}")

    def summary(self) -> str:
        n, k = len(self.sites), len(self.foldable)
        if n == 0:
            return "nothing to fold: the model runs no LayerNorm"
        approx = len(self.approximate)
        return f"{k} of {n} LayerNorms foldable" + (f", {approx} swapped approximately" if approx else "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description of the plan (:meth:`from_dict` reads it back)."""
        return {
            "model_type": self.model_type,
            "summary": self.summary(),
            "sites": [{**asdict(s), "normalized_shape": list(s.normalized_shape)} for s in self.sites],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FoldPlan:
        """The plan that :meth:`to_dict` described (keys it does not know, such as ``summary``, are ignored;
        the captured graph is not part of the description)."""
        site_fields = {f.name for f in fields(NormSite)}
        writer_fields = {f.name for f in fields(Writer)}
        sites = []
        for s in data.get("sites", []):
            kw = {k: v for k, v in s.items() if k in site_fields}
            kw["normalized_shape"] = tuple(kw.get("normalized_shape", ()))
            kw["writers"] = [
                Writer(**{k: v for k, v in w.items() if k in writer_fields}) for w in s.get("writers", [])
            ]
            kw["aliases"] = list(kw.get("aliases", []))
            sites.append(NormSite(**kw))
        return cls(sites=sites, model_type=data.get("model_type", ""))

    def to_dot(self) -> str:
        """The plan as a graphviz DOT graph: norm sites and their writers, grouped by block."""
        from .picture import to_dot

        return to_dot(self, title=f"{self.model_type}: {self.summary()}")

    def save_picture(self, path: str | Path) -> Path:
        """Render the picture to .svg/.png when graphviz is installed, else write the .dot text."""
        from .picture import save_picture

        return save_picture(self.to_dot(), path)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        rows = [("site", "foldable", "reason / writers")]
        for s in self.sites:
            detail = s.reason if not s.foldable else s.writers_summary()
            verdict = {"exact": "yes", "approximate": "approximate", "kept": "no"}[s.verdict]
            rows.append((s.name, verdict, detail or ""))
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]}" for r in rows]
        lines.insert(1, "-" * min(120, max(len(line) for line in lines)))
        return "\n".join([*lines, self.summary()])
