"""The one figure helper: every notebook saves its figures through `save_fig`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Notebooks run headless under papermill.
import matplotlib.pyplot as plt  # noqa: E402

from .models import PROJECT_ROOT  # noqa: E402

logger = logging.getLogger(__name__)

FIGURES_DIR = PROJECT_ROOT / "figures"
DPI = 150  # Chosen default: sharp in the README, small enough to commit.
STYLE = {
    "figure.figsize": (7.0, 4.2),
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
}


def use_style() -> None:
    """Apply the project's matplotlib defaults."""
    plt.rcParams.update(STYLE)


def save_fig(fig: "plt.Figure", fig_id: str, profile: str, figures_dir: str | Path | None = None) -> Path:
    """Save `fig` as ``figures/<profile>/<fig_id>.png`` and return the path.

    Each profile has its own folder, so a smoke run never overwrites the reference figures.
    """
    # The notebook runner sets SD2_FIGURES_DIR when a run (a test, say) must not touch figures/.
    folder = Path(figures_dir or os.environ.get("SD2_FIGURES_DIR") or FIGURES_DIR) / profile
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{fig_id}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    logger.info("Saved figure %s", path)
    return path


use_style()
