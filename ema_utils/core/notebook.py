"""What every chapter notebook does first: seeds, a results folder, a plotting style."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np

from .figures import install_page_formatter


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch, and ask PyTorch for deterministic kernels where it can."""
    # deferred: torch is a heavy import, needed only when a chapter starts
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def start_chapter(chapter: str, results_dir: str | None, seed: int) -> Path:
    """Seed everything, apply the book's figure style and return the chapter's results folder.

    ``results_dir`` is injected by ``ema run``; a notebook opened by hand gets a scratch folder.
    """
    # deferred: matplotlib and seaborn are heavy imports, needed only when a chapter starts
    import matplotlib
    import seaborn as sns

    set_seed(seed)
    # transformers draws its "Loading weights" bars as widgets inside a kernel; in the static
    # book they would be noise (our own progress bars go to stderr, which the book leaves out).
    # deferred: transformers is a heavy import (it loads torch), needed only when a chapter starts
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sns.set_theme(context="notebook", style="whitegrid")
    matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "figure.figsize": (7, 4)})
    install_page_formatter()  # figures fitted to the book's column, at 2x resolution
    if results_dir is None:
        results_dir = tempfile.mkdtemp(prefix=f"ema-{chapter}-")
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
