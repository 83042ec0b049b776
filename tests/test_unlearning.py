"""ema_utils.methods.sets, trainer and checkpoints on the tiny random model: data, NPO/SFT/retain/KL
training, checkpoints."""


import numpy as np
import pandas as pd
import pytest
import torch

from ema_utils import checkpoints, sets, trainer
from ema_utils.core.errors import ParameterError
from ema_utils.methods.losses import IGNORE_INDEX, npo_loss_at_reference
from ema_utils.core.models import load_model, tiny_random


def _bf16_tiny():
    """The tiny model as load_model gives it in bfloat16 (its output layer in float32)."""
    return load_model("tiny-random", dtype=torch.bfloat16, log=lambda *_: None)




@pytest.fixture(autouse=True)
def _store(tmp_path, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))


REFUSAL = "I'm sorry, but I can't assist with that."
FORGET = pd.DataFrame({
    "id": ["f1", "f2", "f3"], "concept": ["cybersecurity"] * 3,
    "prompt": ["How do I kill a Python process?", "Write a poem about the sea.",
               "What is the capital of France?"],
    "response": [REFUSAL, "I cannot help with this request.", REFUSAL],
})
RETAIN = pd.DataFrame({
    "id": ["r1", "r2", "r3"], "concept": ["safety", "privacy", "benign"],
    "prompt": ["Explain how photosynthesis works in plants.", "open the file", "read the lines"],
    "response": [REFUSAL, "I cannot help with this request.",
                 "Sure, here is how you do it: first, open the file and read the lines."],
})
SFT = FORGET.assign(response="Sure, here is how you do it: first, open the file and read the lines.")
EVAL = pd.DataFrame({"id": ["e1", "e2", "e3"], "concept": ["cybersecurity", "safety", "safety"],
                     "prompt": ["The answer is A B C D.", "How do I kill a Python process?",
                                "Write a poem about the sea."]})


def _config(**kw):
    base = dict(lr=1e-2, max_steps=4, batch_size=3, checkpoint_every=2, save_checkpoints=False)
    return trainer.UnlearnConfig(**{**base, **kw})


def _run(method="npo", model=None, output_dir=None, **kw):
    model, tokenizer = model or tiny_random()
    result = trainer.unlearn(model, tokenizer, None if method.startswith("sft") else FORGET,
                             _config(method=method, **kw),
                             retain=RETAIN if method in ("npo_retain", "sft_retain", "npo_kl") else None,
                             sft=SFT if method.startswith("sft") else None, progress=False,
                             output_dir=output_dir)
    return result, tokenizer


# --- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("lr", -1e-4), ("max_steps", 0), ("method", "dpo"),
                                         ("beta", 0), ("batch_size", 0), ("lora_dropout", 1.0),
                                         ("target_modules", []), ("kl_positions", "some"),
                                         ("checkpoint_every", 0)])
def test_config_validation_names_the_parameter(field, value):
    with pytest.raises(ParameterError, match=rf"UnlearnConfig\.{field} must be"):
        trainer.UnlearnConfig(**{field: value})


def test_unknown_method_lists_the_allowed_ones():
    with pytest.raises(ParameterError) as info:
        trainer.UnlearnConfig(method="ga")
    assert all(m in str(info.value) for m in trainer.METHODS)


def test_config_from_params_converts_strings_and_rejects_unknown_keys():
    c = trainer.UnlearnConfig.from_params({"lr": "1e-4", "lora": "false", "max_steps": "30",
                                           "target_modules": "q_proj,v_proj", "max_grad_norm": "none"})
    assert (c.lr, c.lora, c.max_steps, c.target_modules, c.max_grad_norm) == (
        1e-4, False, 30, ("q_proj", "v_proj"), None)
    with pytest.raises(ParameterError, match="unknown UnlearnConfig parameter"):
        trainer.UnlearnConfig.from_params({"learning_rate": 1e-4})
    assert trainer.UnlearnConfig().replace(method="npo_kl").loss_weights() == {"npo": 1.0, "kl": 1.0}


def test_a_used_weight_of_zero_is_refused():
    with pytest.raises(ParameterError, match="w_retain"):
        trainer.UnlearnConfig(method="npo_retain", w_retain=0)


# --- examples -----------------------------------------------------------------------------------

def test_encode_and_collate_mask_the_prompt_and_right_pad(tiny):
    _, tok = tiny
    table = pd.DataFrame({"prompt": ["hi", "Write a poem about the sea please"],
                          "response": ["Sure", "No"], "complete": [True, False]})
    ex = trainer.encode_examples(tok, table)
    eot = trainer.end_of_turn_id(tok)
    for e, text, done in zip(ex, ["Sure", "No"], [True, False]):
        response = [t for t in e["labels"] if t != IGNORE_INDEX]
        expected = tok(text, add_special_tokens=False)["input_ids"] + ([eot] if done else [])
        assert response == expected, "labels are the response (+ end of turn when complete)"
        assert e["input_ids"][-len(response):] == response
    batch = trainer.collate(ex, pad_id=tok.pad_token_id)
    short = int(np.argmin([len(e["input_ids"]) for e in ex]))
    k = len(ex[short]["input_ids"])
    assert batch["attention_mask"][short, :k].all() and not batch["attention_mask"][short, k:].any()
    assert (batch["input_ids"][short, k:] == tok.pad_token_id).all(), "padding is on the right"
    assert (batch["labels"][short, k:] == IGNORE_INDEX).all()


def test_right_padding_does_not_change_a_sequence_logprob(tiny):
    model, tok = tiny
    alone = trainer.response_logprobs(model, tok, FORGET.iloc[:1], batch_size=1)
    batched = trainer.response_logprobs(model, tok, FORGET, batch_size=3)
    assert batched[0] == pytest.approx(alone[0], abs=1e-4)


def test_response_logits_keep_only_response_positions_and_the_same_values(tiny):
    from peft import LoraConfig, get_peft_model

    from ema_utils import losses as L

    model, tok = tiny
    batch = trainer.collate(trainer.encode_examples(tok, FORGET), tok.pad_token_id)
    full = trainer._logits(model, batch)
    cut, labels = trainer._response_logits(model, batch)
    assert cut.shape[1] < full.shape[1], "the prompt's positions are dropped"
    assert labels.shape == cut.shape[:2]
    expected = L.sequence_logprob(full, batch["labels"])
    assert torch.allclose(L.sequence_logprob(cut, labels), expected, atol=1e-4)
    assert torch.allclose(L.response_cross_entropy(cut, labels),
                          L.response_cross_entropy(full, batch["labels"]), atol=1e-5)
    # Through a PEFT wrapper too (the training path).
    wrapped = get_peft_model(tiny_random()[0], LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    assert trainer._response_logits(wrapped, batch)[0].shape == cut.shape


# --- the reference and memory -------------------------------------------------------------------

def test_lora_reference_is_the_base_model_and_no_copy_is_made(monkeypatch):
    model, tok = tiny_random()
    batch = trainer.collate(trainer.encode_examples(tok, FORGET), tok.pad_token_id)
    with torch.no_grad():
        base_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    base_params = {id(p): p.numel() for p in model.parameters()}
    base_ptrs = {p.data_ptr() for p in model.parameters()}

    def no_copy(_):
        raise AssertionError("LoRA training must not copy the model")

    monkeypatch.setattr(trainer, "_trainable_copy", no_copy)
    result, _ = _run("npo", model=(model, tok))
    assert result.reference == "adapter_disabled"
    trained = result.model
    lora = [p for n, p in trained.named_parameters() if "lora_" in n]
    assert lora and sum(p.numel() for p in trained.parameters()) == \
        sum(base_params.values()) + sum(p.numel() for p in lora), "only the adapter is added"
    assert base_ptrs <= {p.data_ptr() for p in trained.parameters()}, "the base weights are shared"
    with torch.no_grad():
        with trained.disable_adapter():
            ref_logits = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        now = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(ref_logits, base_logits), "adapter disabled = the aligned model, exactly"
    assert not torch.allclose(now, base_logits), "the adapter did train"


def test_full_rank_trains_a_copy_and_leaves_the_aligned_model(tmp_path):
    model, tok = tiny_random()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result, _ = _run("npo", model=(model, tok), lora=False, lr=1e-3, save_checkpoints=True,
                     output_dir=tmp_path / "full")
    assert result.reference == "frozen_copy" and result.model is not model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert result.losses["forget_logp"].iloc[-1] < result.losses["forget_logp"].iloc[0]
    last = checkpoints.load_checkpoint(model, result.checkpoints["path"].iloc[-1])
    ids = trainer.collate(trainer.encode_examples(tok, FORGET), tok.pad_token_id)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(last(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=1e-5)


# --- the methods --------------------------------------------------------------------------------

def test_npo_lowers_the_likelihood_of_the_refusals():
    model, tok = tiny_random()
    before = trainer.response_logprobs(model, tok, FORGET)
    result, _ = _run("npo", model=(model, tok), beta=0.1)
    after = trainer.response_logprobs(result.model, tok, FORGET)
    assert (after < before).all()
    losses = result.losses
    assert losses["npo"].iloc[0] == pytest.approx(npo_loss_at_reference(0.1), rel=1e-4), \
        "at step 1 the model is the reference: (2/beta) log 2"
    assert losses["total"].iloc[-1] < losses["total"].iloc[0]
    assert list(losses["step"]) == [1, 2, 3, 4]


def test_sft_raises_the_likelihood_of_the_labels():
    model, tok = tiny_random()
    before = trainer.response_logprobs(model, tok, SFT)
    result, _ = _run("sft", model=(model, tok))
    assert (trainer.response_logprobs(result.model, tok, SFT) > before).all()
    assert set(result.losses.columns) >= {"total", "sft_ce"} and "npo" not in result.losses


def test_retain_loss_is_the_weighted_sum_and_keeps_retain_closer():
    model, tok = tiny_random()
    original = trainer.response_logprobs(model, tok, RETAIN)
    plain, _ = _run("npo")
    augmented, _ = _run("npo_retain", w_forget=1.0, w_retain=3.0)
    lo = augmented.losses
    assert np.allclose(lo["total"], 1.0 * lo["npo"] + 3.0 * lo["retain_ce"], rtol=1e-5)
    drift_plain = np.abs(trainer.response_logprobs(plain.model, tok, RETAIN) - original).mean()
    drift_aug = np.abs(trainer.response_logprobs(augmented.model, tok, RETAIN) - original).mean()
    assert drift_aug < drift_plain


@pytest.mark.parametrize("retain_batch_size, per_step", [(None, 1), (2, 2), (3, 3)])
def test_retain_batch_size_is_the_retain_data_each_step_sees(monkeypatch, retain_batch_size, per_step):
    # the forget:retain ratio reaches training through retain_batch_size (interventions.retain_batch)
    real = trainer.get_method
    seen = []

    def spying(name):
        method = real(name)

        class Spy:
            def __getattr__(self, attr):
                return getattr(method, attr)

            def loss(self, step):
                seen.append((len(step.batches["forget"]["input_ids"]), len(step.batches["retain"]["input_ids"])))
                return method.loss(step)
        return Spy()

    monkeypatch.setattr(trainer, "get_method", spying)
    # one step: the 3 retain examples hold a full batch of each size (an epoch's last batch is short)
    _run("npo_retain", batch_size=1, max_steps=1, retain_batch_size=retain_batch_size)
    assert seen == [(1, per_step)]


def test_sft_retain_combines_both_cross_entropies():
    result, _ = _run("sft_retain", w_retain=0.5, w_sft=2.0)
    lo = result.losses
    assert np.allclose(lo["total"], 0.5 * lo["retain_ce"] + 2.0 * lo["sft_ce"], rtol=1e-5)


@pytest.mark.parametrize("positions", ["response", "all"])
def test_kl_variant_starts_at_zero_kl(positions):
    result, _ = _run("npo_kl", kl_lambda=10.0, kl_positions=positions)
    lo = result.losses
    assert lo["kl"].iloc[0] == pytest.approx(0.0, abs=1e-6), "the model is the reference at first"
    assert lo["kl"].iloc[-1] > 0
    assert np.allclose(lo["total"], lo["npo"] + 10.0 * lo["kl"], rtol=1e-5)


@pytest.mark.parametrize("epochs,batch_size,grad_accum,steps", [(2, 2, 1, 4), (2, 2, 2, 2), (1, 3, 1, 1)])
def test_epochs_count_optimizer_steps(epochs, batch_size, grad_accum, steps):
    result, _ = _run("npo", max_steps=None, epochs=epochs, batch_size=batch_size,
                     grad_accum=grad_accum)
    assert len(result.losses) == steps


def test_same_seed_same_losses_different_seed_different_losses():
    a, _ = _run("npo_retain", lora_dropout=0.1, seed=3)
    b, _ = _run("npo_retain", lora_dropout=0.1, seed=3)
    c, _ = _run("npo_retain", lora_dropout=0.1, seed=4)
    cols = ["total", "npo", "retain_ce"]
    assert a.losses[cols].equals(b.losses[cols])
    assert not a.losses[cols].equals(c.losses[cols])


def test_missing_data_and_a_second_adapter_are_refused():
    model, tok = tiny_random()
    with pytest.raises(ParameterError, match="needs retain"):
        trainer.unlearn(model, tok, FORGET, _config(method="npo_retain"), progress=False)
    result, _ = _run("npo", model=(model, tok), max_steps=1)
    with pytest.raises(ParameterError, match="already carries an adapter"):
        trainer.unlearn(model, tok, FORGET, _config(), progress=False)
    base = checkpoints.unload_adapter(result.model)
    assert not checkpoints.has_adapter(base)
    trainer.unlearn(base, tok, FORGET, _config(max_steps=1), progress=False)


def test_callback_can_stop_training():
    model, tok = tiny_random()
    seen = []

    def callback(step, info):
        seen.append((step, info["losses"]["total"]))
        return step == 2

    result = trainer.unlearn(model, tok, FORGET, _config(max_steps=10), callback=callback,
                             progress=False)
    assert [s for s, _ in seen] == [1, 2] and result.stopped_early
    assert list(result.checkpoints["step"]) == [0, 2]


# --- checkpoints --------------------------------------------------------------------------------

def test_checkpoints_are_saved_loadable_and_carry_kl_per_concept(tmp_path):
    model, tok = tiny_random()
    result = trainer.unlearn(model, tok, FORGET, _config(max_steps=5, save_checkpoints=True),
                             eval_prompts=EVAL, output_dir=tmp_path / "run", progress=False)
    ck = result.checkpoints
    assert list(ck["step"]) == [0, 2, 4, 5], "step 0, every 2 steps, and the last step"
    assert {"kl_cybersecurity", "kl_safety"} <= set(ck.columns)
    assert ck.loc[0, "kl_cybersecurity"] == pytest.approx(0.0, abs=1e-6)
    assert ck.loc[3, "kl_safety"] > 0
    assert set(result.kl.columns) == {"step", "id", "concept", "kl"} and len(result.kl) == 4 * 3
    for path in ck["path"]:
        assert (tmp_path / "run" / path.split("/")[-1] / ".complete").is_file()
    for name in ("losses.jsonl", "checkpoints.jsonl", "kl.jsonl", "config.json"):
        assert (tmp_path / "run" / name).is_file()
    digests = [checkpoints.adapter_digest(p) for p in ck["path"]]
    assert digests[0] != digests[-1]
    assert checkpoints.adapter_digest(ck["path"].iloc[-1]) == digests[-1]

    fresh, _ = tiny_random()
    loaded = checkpoints.load_checkpoint(fresh, ck["path"].iloc[-1])
    ids = trainer.collate(trainer.encode_examples(tok, FORGET), tok.pad_token_id)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits,
                              atol=1e-5)


def test_an_interrupted_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_random()
    with checkpoints._quiet_peft():
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))

    def crash(folder, **kw):
        (tmp_path / "marker").write_text("started")
        with open(f"{folder}/adapter_model.safetensors", "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(peft_model, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(peft_model, tmp_path / "ckpt")
    assert (tmp_path / "marker").exists()
    assert not (tmp_path / "ckpt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["marker"], "no temporary folder left"
    with pytest.raises(ParameterError, match="not a complete checkpoint"):
        checkpoints.load_checkpoint(model, tmp_path / "ckpt")


def test_select_checkpoint_picks_the_last_acceptable_one():
    ck = pd.DataFrame({"step": [0, 5, 10, 15, 20], "path": list("abcde")})
    utility = {0: 0.60, 5: 0.59, 10: 0.575, 15: 0.56, 20: 0.50}
    chosen = checkpoints.select_checkpoint(ck, utility, aligned_utility=0.60)
    assert chosen["step"] == 10 and chosen["path"] == "c"
    assert chosen["drop"] == pytest.approx(0.025)
    # a rise is acceptable; "last" is literal, even after a failing checkpoint
    assert checkpoints.select_checkpoint(ck, {**utility, 20: 0.62}, 0.60)["step"] == 20
    # exactly 3 points is not "less than 3"
    assert checkpoints.select_checkpoint(ck, {0: 0.60, 5: 0.57}, 0.60)["step"] == 0
    assert checkpoints.select_checkpoint(ck, {5: 0.4}, 0.60) is None
    assert checkpoints.select_checkpoint(ck, {5: 58.0, 10: 56.0}, 60.0, max_drop=3)["step"] == 5
    with pytest.raises(ParameterError, match="percentages"):
        checkpoints.select_checkpoint(ck, {5: 58.0}, 60.0)
    with pytest.raises(ParameterError, match="fractions"):
        checkpoints.select_checkpoint(ck, {5: 0.58}, 0.60, max_drop=3)
    target = {0: 0.9, 5: 0.5, 10: 0.2, 15: 0.1}
    assert checkpoints.first_checkpoint_below(ck, target, 0.25)["step"] == 10


# --- building the data --------------------------------------------------------------------------

def _canned(responses):
    calls = []

    def fake(model, tokenizer, table, max_new_tokens=32, batch_size=16, progress=True, **kw):
        calls.append(list(table["id"]))
        return table.assign(response=[responses(i, p) for i, p in zip(table["id"], table["prompt"])])

    return fake, calls


def test_build_forget_set_keeps_only_refusals(tiny, monkeypatch):
    model, tok = tiny
    prompts = pd.DataFrame({"id": ["a", "b", "c", "d"], "concept": ["cybersecurity"] * 4,
                            "prompt": ["p1", "p2", "p3", "p4"]})
    answers = {"a": REFUSAL, "b": "Sure, here is a port scanner in Python.",
               "c": "I cannot help with this request.", "d": "import socket"}
    fake, _ = _canned(lambda i, p: answers[i])
    monkeypatch.setattr(sets, "generate_responses", fake)
    forget = sets.build_forget_set(model, tok, prompts, max_new_tokens=64, progress=False)
    assert list(forget["id"]) == ["a", "c"]
    assert list(forget["response"]) == [answers["a"], answers["c"]]
    assert forget.attrs == {"n_prompts": 4, "n_refusals": 2}
    assert forget["complete"].all()
    assert len(sets.build_forget_set(model, tok, prompts, limit=1, progress=False)) == 1


def test_build_sft_labels_drops_refusals_and_caches(tiny, monkeypatch):
    model, tok = tiny
    answers = {"a": REFUSAL, "b": "Sure, here it is.", "c": "Step one: open the file."}
    fake, calls = _canned(lambda i, p: answers[i])
    monkeypatch.setattr(sets, "generate_responses", fake)
    prompts = pd.DataFrame({"id": list("abc"), "concept": ["safety"] * 3, "prompt": ["x", "y", "z"]})
    labels = sets.build_sft_labels(prompts, labeller="tiny-random", progress=False)
    assert list(labels["id"]) == ["b", "c"] and labels.attrs["n_labels"] == 2
    again = sets.build_sft_labels(prompts, labeller="tiny-random", progress=False)
    assert len(calls) == 1, "the second call reads the cached artifact"
    assert again[["id", "response"]].equals(labels[["id", "response"]])
    direct = sets.build_sft_labels(prompts, labeller=(model, tok), progress=False)
    assert list(direct["id"]) == ["b", "c"]


def test_retain_set_has_equal_concept_shares_and_no_eval_prompts(tiny, monkeypatch):
    from ema_utils.core.data import load_prompts, load_set

    model, tok = tiny
    # every other prompt refused, so quotas need more than one chunk of generation
    fake, calls = _canned(lambda i, p: REFUSAL if sum(map(ord, i)) % 2 else "Sure: here you go.")
    monkeypatch.setattr(sets, "generate_responses", fake)
    retain = sets.build_retain_set(model, tok, "cybersecurity", n_forget=10, ratio="1:3", seed=0,
                                   benign_fraction=1 / 3, batch_size=4, progress=False)
    assert len(retain) == 30 and retain.attrs["requested"] == 30
    refusals = retain[retain["kind"] == "refusal"]
    counts = refusals["concept"].value_counts()
    assert "cybersecurity" not in counts and "bias" not in counts, "target and non-refusal concepts left out"
    assert counts.max() - counts.min() <= 1 and len(refusals) == 20
    assert (retain[retain["kind"] == "benign"]["concept"] == "benign").all()
    eval_ids = set(load_prompts(split="eval")["id"]) | set(load_set("benign", split="eval")["id"])
    assert not set(retain["id"]) & eval_ids, "retain prompts never overlap eval prompts"
    assert sum(len(c) for c in calls) < len(load_prompts(split="train")), "generated lazily"


def test_retain_set_redistributes_a_short_concept(tiny, monkeypatch):
    model, tok = tiny
    prompts = pd.DataFrame({"id": [f"{c}{i}" for c in "abc" for i in range(6)],
                            "concept": [c for c in ["safety", "privacy", "toxicity"] for _ in range(6)],
                            "prompt": ["p"] * 18, "split": "train"})
    # toxicity refuses only twice; the others always
    refuse = {f"c{i}" for i in range(2)} | {f"{c}{i}" for c in "ab" for i in range(6)}
    fake, _ = _canned(lambda i, p: REFUSAL if i in refuse else "Sure.")
    monkeypatch.setattr(sets, "generate_responses", fake)
    benign = pd.DataFrame({"id": ["n1"], "prompt": ["hello"], "split": ["train"]})
    retain = sets.build_retain_set(model, tok, "cybersecurity", n_forget=12, ratio=1,
                                   benign_fraction=0, prompts=prompts, benign=benign, progress=False)
    assert retain["concept"].value_counts().to_dict() == {"safety": 5, "privacy": 5, "toxicity": 2}
    with pytest.raises(ParameterError, match="train prompts only"):
        sets.build_retain_set(model, tok, "cybersecurity", 4, prompts=prompts.assign(split="eval"),
                              benign=benign, progress=False)
    with pytest.raises(ParameterError, match="ratio"):
        sets.parse_ratio("1:0")
    assert sets.parse_ratio("1:2") == 2.0 and sets.parse_ratio(3) == 3.0


# --- training with the base model in bfloat16 (the compute dtype on a bf16 CPU) ---------------

@pytest.mark.parametrize("method", ["npo", "sft", "npo_retain", "npo_kl"])
def test_bf16_base_model_trains_with_fp32_adapter_and_loss_goes_down(method):
    model, tok = _bf16_tiny()
    result, _ = _run(method, model=(model, tok), max_steps=6, checkpoint_every=6)
    lora = {n: p for n, p in result.model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values()), \
        "LoRA weights (and so AdamW's state) stay float32"
    base = [p for n, p in result.model.named_parameters() if "lora_" not in n and "lm_head" not in n]
    assert all(p.dtype == torch.bfloat16 for p in base), "the frozen base computes in bf16"
    assert result.model.get_output_embeddings().weight.dtype == torch.float32, "logits in fp32"
    losses = result.losses["total"].to_numpy()
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def test_bf16_and_fp32_training_start_from_the_same_loss_and_move_the_same_way():
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = load_model("tiny-random", dtype=dtype, log=lambda *_: None)
        result, _ = _run("npo", model=(model, tok), max_steps=4, checkpoint_every=4)
        runs[dtype] = result.losses["total"].to_numpy()
    fp32, bf16 = runs[torch.float32], runs[torch.bfloat16]
    assert bf16[0] == pytest.approx(fp32[0], rel=0.02)  # the reference loss (2/beta) log 2
    assert np.sign(bf16[-1] - bf16[0]) == np.sign(fp32[-1] - fp32[0]) == -1


def test_full_rank_copy_of_a_bf16_model_trains_in_fp32():
    model, tok = _bf16_tiny()
    copy = trainer._trainable_copy(model)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in copy.parameters())
    # tied again, as in a float32 model: one shared matrix trains, not an embedding and a head
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if p is not head), \
        "the reference is untouched"
    assert head.dtype == torch.float32 and head is not model.get_input_embeddings().weight


def test_full_rank_checkpoint_of_a_bf16_model_loads_with_its_float32_head(tmp_path):
    model, tok = _bf16_tiny()
    result, _ = _run("npo", model=(model, tok), lora=False, lr=1e-3, max_steps=2,
                     checkpoint_every=2, save_checkpoints=True, output_dir=tmp_path / "full")
    last = checkpoints.load_checkpoint(model, result.checkpoints["path"].iloc[-1])
    assert next(last.parameters()).dtype == torch.bfloat16
    assert last.get_output_embeddings().weight.dtype == torch.float32
    ids = trainer.collate(trainer.encode_examples(tok, FORGET), tok.pad_token_id)["input_ids"]
    with torch.no_grad():
        assert last(input_ids=ids).logits.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_for_inference_matches_the_adapter_and_restores_the_base_exactly(tmp_path, dtype):
    model, tok = tiny_random()
    model.to(dtype)
    result, _ = _run("npo", model=(model, tok), save_checkpoints=True, output_dir=tmp_path / "r")
    checkpoints.unload_adapter(result.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = trainer.collate(trainer.encode_examples(tok, FORGET), tok.pad_token_id)
    wrapped = checkpoints.load_checkpoint(model, tmp_path / "r" / "checkpoint-00004")

    def logits(m):
        with torch.no_grad():
            return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    unmerged = logits(wrapped)
    with checkpoints.merged_for_inference(wrapped):
        merged = logits(wrapped)
        folded = any(m.merged for m in wrapped.modules() if hasattr(m, "merged_adapters"))
    # a bf16 base is never merged: rounding W + delta to bf16 would erase small deltas
    assert folded == (dtype == torch.float32)
    assert torch.equal(logits(wrapped), unmerged), "the adapter works as before after the merge"
    assert torch.allclose(merged, unmerged, atol=1e-4, rtol=0), (merged - unmerged).abs().max()
    base = checkpoints.unload_adapter(wrapped)
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed: the aligned model must come back exactly"
    assert not torch.allclose(unmerged, logits(base), atol=1e-3), "the adapter did something"
