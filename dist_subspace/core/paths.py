"""Where the project's shipped files are, in one place: the DeepSpeed configs (``ds_configs/``) and the public model
configs the planner knows (``configs/models/``). In a checkout they are the top-level folders users edit; an
installed wheel carries the same files inside the package (``dist_subspace/_shipped/``, links to those folders)."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # dist_subspace/ (this file is dist_subspace/core/paths.py)
CHECKOUT = PACKAGE.parent  # the repository root in a checkout (site-packages in an installed wheel)


def shipped(*parts: str) -> Path:
    """The checkout's top-level folder ``parts``, else the package's copy of it."""
    top = CHECKOUT.joinpath(*parts)
    return top if top.is_dir() else PACKAGE.joinpath("_shipped", *parts)


DS_CONFIGS = shipped("ds_configs")
MODEL_CONFIGS = shipped("configs", "models")


def shown(path: Path) -> str:
    """``path`` relative to the checkout where it lies inside it (for messages and JSON), else as it is."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(CHECKOUT)) if resolved.is_relative_to(CHECKOUT) else str(path)
