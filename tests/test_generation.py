"""ema_utils.core.generation on the tiny random model."""

import pandas as pd
import pytest
import torch

from ema_utils.core.errors import ParameterError
from ema_utils.core import generation
from ema_utils.core.generation import (
    chat_text, generate_responses, generation_batch_size, left_pad, length_sorted_batches)


def test_left_pad_puts_padding_on_the_left():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_length_sorted_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 7]
    batches = length_sorted_batches(lengths, 2)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert batches[0] == [2, 4], "longest prompts first"


def test_a_token_budget_shrinks_batches_of_long_prompts_only():
    lengths = [200, 190, 180, 60, 60, 60, 60, 500]
    batches = length_sorted_batches(lengths, 4, max_tokens=400)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert batches[0] == [7], "a prompt over the budget gets a batch of its own"
    assert batches[1:3] == [[0, 1], [2, 3]]  # 2 x 200 and 2 x 180 fit 400; 3 rows would not
    assert batches[3] == [4, 5, 6]  # the short ones that are left, in one batch
    assert all(len(b) * max(lengths[i] for i in b) <= 400 for b in batches if len(b) > 1)
    assert length_sorted_batches(lengths, 4, max_tokens=None) == length_sorted_batches(lengths, 4)
    with pytest.raises(ParameterError, match="max_tokens"):
        length_sorted_batches(lengths, 4, max_tokens=0)


def _prompts():
    return pd.DataFrame({"id": ["a", "b", "c"], "concept": ["x", "y", "x"],
                         "prompt": ["hi", "Write a poem about the sea please", "What is 2+2?"]})


def test_generation_keeps_order_and_columns(tiny):
    model, tokenizer = tiny
    out = generate_responses(model, tokenizer, _prompts(), max_new_tokens=5, batch_size=2,
                             progress=False)
    assert out["id"].tolist() == ["a", "b", "c"]
    assert list(out.columns) == ["id", "concept", "prompt", "response"]
    assert all(isinstance(r, str) for r in out["response"])


def test_batching_does_not_change_greedy_output(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(generation, "CPU_GREEDY_BATCH", 1)  # so batch_size=1 is one per batch
    one = generate_responses(model, tokenizer, _prompts(), max_new_tokens=6, batch_size=1,
                             progress=False)
    many = generate_responses(model, tokenizer, _prompts(), max_new_tokens=6, batch_size=3,
                              progress=False)
    assert one["response"].tolist() == many["response"].tolist()


def test_greedy_generation_on_a_cpu_takes_at_least_the_cpu_batch(tiny, monkeypatch):
    assert generation_batch_size(16, "cpu") == generation.CPU_GREEDY_BATCH == 64
    assert generation_batch_size(128, "cpu") == 128  # a larger request stands
    assert generation_batch_size(16, "cpu", temperature=0.8) == 16  # sampling: seeded per batch
    assert generation_batch_size(16, "cuda") == 16  # a GPU takes batch_size as it is
    model, tokenizer = tiny
    calls = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(len(kw["input_ids"]))
                        or real_generate(**kw))
    generate_responses(model, tokenizer, _prompts(), max_new_tokens=3, batch_size=1, progress=False)
    assert calls == [3], "greedy on a CPU: the three prompts in one batch"
    calls.clear()
    generate_responses(model, tokenizer, _prompts(), max_new_tokens=3, batch_size=1,
                       temperature=0.9, progress=False)
    assert calls == [1, 1, 1], "sampling keeps batch_size"


def test_generation_matches_unbatched_generate(tiny):
    model, tokenizer = tiny
    prompt = "What is 2+2?"
    ids = tokenizer(chat_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**ids, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    out = generate_responses(model, tokenizer, [prompt], max_new_tokens=6, progress=False)
    assert out["response"][0] == expected


def test_generation_works_through_a_peft_adapter(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    try:
        out = generate_responses(wrapped, tokenizer, ["hi"], max_new_tokens=3, progress=False)
        assert len(out) == 1
    finally:
        wrapped.unload()  # leave the session fixture's model as it was


def test_bad_parameters_are_named(tiny):
    model, tokenizer = tiny
    with pytest.raises(ParameterError, match="max_new_tokens"):
        generate_responses(model, tokenizer, ["hi"], max_new_tokens=0)
    with pytest.raises(ParameterError, match="'prompt'"):
        generate_responses(model, tokenizer, pd.DataFrame({"id": [1]}))


def test_shared_prefix_length_leaves_every_prompt_a_token_of_its_own():
    from ema_utils.core.generation import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # not the whole shorter prompt
    assert shared_prefix_length([[1, 2, 3]]) == 0 and shared_prefix_length([[7], [8]]) == 0


def test_prefix_pad_puts_padding_between_prefix_and_row():
    from ema_utils.core.generation import prefix_pad

    ids, mask = prefix_pad([1, 2], [[5], [6, 7, 8]], pad_id=0)
    assert ids.tolist() == [[1, 2, 0, 0, 5], [1, 2, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]]


def test_prefix_cache_gives_the_plain_path_responses(tiny):
    model, tokenizer = tiny
    prompts = ["How do I kill a Python process?", "Write a poem about the sea.",
               "What is the capital of France?", "Explain how photosynthesis works in plants.",
               "The answer is A"]
    system = "You are a helpful assistant that answers briefly."
    plain = generate_responses(model, tokenizer, prompts, max_new_tokens=12, batch_size=2,
                               system=system, progress=False, prefix_cache=False)
    cached = generate_responses(model, tokenizer, prompts, max_new_tokens=12, batch_size=2,
                                system=system, progress=False, prefix_cache=True)
    assert cached["response"].tolist() == plain["response"].tolist()
