"""The one sidecar file, ``cbwc.json``, written beside every artefact the package produces.

One JSON object with a section per concern, each written by its owner and merged with what is there:
``plan`` (the fold plan, :meth:`FoldPlan.to_dict`), ``architecture`` (how to rebuild the unfolded model),
``exports`` (format -> the check record of that artefact), ``training`` (what the CBWC callback trained) and
``report`` (a recipe's measurements).  :func:`lightning_cbwc.load_folded` reads ``plan`` and ``architecture``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

SIDECAR = "cbwc.json"
#: sections that collect one entry per artefact (format -> record): merged key by key; every other section
#: describes the one model or run in the folder, and a new value replaces it whole (no stale keys)
MERGED_SECTIONS = frozenset({"exports"})


def sidecar_path(folder: str | Path) -> Path:
    return Path(folder) / SIDECAR


def read_sidecar(folder: str | Path) -> dict[str, Any]:
    """The sidecar of ``folder`` ({} when there is none yet); a file that is not a JSON object is an error."""
    path = sidecar_path(folder)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}): delete it or export again") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a JSON object: delete it or export again")
    return data


def update_sidecar(folder: str | Path, **sections: Any) -> Path:
    """Write ``sections`` into the sidecar of ``folder``: ``exports`` is merged key by key into the one already
    there (``exports={"onnx": record}`` keeps the other formats' records); any other section replaces its
    old value."""
    path = sidecar_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = read_sidecar(folder)
    for name, value in sections.items():
        old = data.get(name)
        merge = name in MERGED_SECTIONS and isinstance(old, dict) and isinstance(value, dict)
        data[name] = {**old, **value} if merge else value
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
