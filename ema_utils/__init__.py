"""ema_utils: the thin library behind the emergent-misalignment companion book.

Every notebook calls into this package; all real logic lives here and is tested in tests/.
It is built in layers, each importing only itself and the layers below:

- ``core``: models, generation, data, judges, metrics, evaluation, the caches and results;
- ``methods``: the training methods (registry, losses, sets, trainer, checkpoints, conditions)
  and the interventions that train and score them;
- ``chapters``: one module per chapter's analysis, with its plots and exercise checks;
- ``build``: orchestration of the chapters, the book, the course editions, the benchmark;
- ``cli``: the ``ema`` command on top.

``from ema_utils import models`` (any module by its short name) works as well as
``from ema_utils.core import models``.
"""

import importlib

__version__ = "0.1.0"

CONCEPTS = (
    "cybersecurity",
    "safety",
    "toxicity",
    "bias",
    "sensitive_content",
    "medical_legal",
    "privacy",
)
"""The paper's seven responsible-AI concepts, by their keys used everywhere in the project."""

CHAPTERS = ("setup", "unlearning", "cross_domain", "mitigation", "entanglement", "narrow_general")
"""Chapter names, in book order (notebooks/NN_<name>.ipynb)."""


LAYERS = {
    "core": ("errors", "paths", "console", "cache", "params", "results", "models", "generation",
             "embeddings", "metrics", "data", "sources", "scorers", "judges", "evaluate", "figures",
             "notebook"),
    "methods": ("losses", "registry", "condition", "sets", "checkpoints", "trainer", "interventions"),
    "chapters": ("tables", "report", "run_options", "mitigation", "activations", "concepts", "rank_correlation",
                 "directions", "narrow", "stability", "steering", "plots", "recovery_plots", "widgets",
                 "exercises"),
    "build": ("orchestrate", "compare", "book", "course", "bench", "bench_measures", "dtype_check"),
}
"""Each layer's modules, from the bottom up (the README's layout table shows the same)."""

_LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}


def __getattr__(name: str):
    # `from ema_utils import models` finds the module in its layer, imported on first use so
    # that `import ema_utils` stays light (PEP 562).
    if name in _LAYER_OF:
        return importlib.import_module(f"{__name__}.{_LAYER_OF[name]}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
