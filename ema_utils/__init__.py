"""ema_utils: the thin library behind the emergent-misalignment companion book.

Every notebook calls into this package; all real logic (model loading, data, generation,
judges, unlearning, metrics, orchestration) lives here and is tested in tests/.
"""

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
