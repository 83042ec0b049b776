"""`ema bench`: the quick bench on tiny-random prints every figure and ratio, with sane values.

A benchmark, not a timed test: the values are checked for shape and consistency (positive,
ratios equal to the quotient of their figures, targets judged by their comparison), never
against a speed.
"""

import json
import math
import time

import pytest
import torch

from ema_utils import bench, bench_measures, cli
from ema_utils.build.orchestrate import get_profile


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """`ema bench --quick --model tiny-random --json`, run once in this process on one thread,
    with a private build folder (so no recorded chapter run is found)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EMA_BUILD_DIR", str(tmp_path_factory.mktemp("bench-build")))
    mp.setenv("EMA_CACHE_DIR", str(tmp_path_factory.mktemp("bench-cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(["bench", "--quick", "--model", "tiny-random", "--json"])
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "seconds": time.perf_counter() - start}


def test_quick_bench_prints_one_json_document(quick_report):
    assert quick_report["rc"] == 0, quick_report["stderr"][-3000:]
    report = json.loads(quick_report["stdout"])  # stdout holds exactly one JSON document
    assert report["model"] == "tiny-random" and report["quick"] is True
    assert "[ema bench]" in quick_report["stderr"]  # progress went to stderr
    # Generous bound on a shared, busy machine; about 35-65 s seen on 2 loaded cores.
    assert quick_report["seconds"] < 180


def test_every_figure_is_positive_or_explained(quick_report):
    report = json.loads(quick_report["stdout"])
    figures = report["figures"]
    assert set(figures) == set(bench.FIGURES)
    assert set(report["units"]) == set(bench.FIGURES)
    # --quick on tiny-random skips exactly these two, each with its reason.
    assert set(report["not_measured"]) == {"load_cold_s", "chapter_peak_rss_mib"}
    for name, value in figures.items():
        if name in report["not_measured"]:
            assert value is None and report["not_measured"][name]
        else:
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    # The model's FLOP/s can never exceed... a sane multiple of the roof; tokens within limits.
    d = report["details"]
    assert d["eval"]["generated_tokens"] <= d["eval"]["prompts"] * d["eval"]["max_new_tokens"]
    assert d["naive_eval"]["generated_tokens"] <= d["naive_eval"]["prompts"] * d["naive_eval"]["max_new_tokens"]
    setup = get_profile("cpu")["setup"]  # the eval settings are the cpu profile's setup block
    assert (d["eval"]["batch_size"], d["eval"]["max_new_tokens"]) == (setup["batch_size"],
                                                                      setup["max_new_tokens"])
    assert report["settings"]["npo_batch_size"] == 4 and report["settings"]["npo_lora_r"] == 16
    # the fast path runs in the compute dtype, the fp32 path and the naive loop in float32
    assert d["eval"]["dtype"] == report["compute_dtype"] and d["eval_fp32"]["dtype"] == "float32"
    assert d["eval"]["prefix_cache"] and not d["eval_fp32"]["prefix_cache"]
    assert d["verdicts"]["items"] == d["eval"]["prompts"] >= d["verdicts"]["agreed"]
    if report["compute_dtype"] != "float32":
        assert d["npo_lora_fp32"]["seconds"] and "npo_lora_fp32_s_per_step" in figures
    for variant in ("lora", "naive"):
        rec = d[f"npo_{variant}"]
        assert rec["peak_rss_mib"] >= rec["rss_before_mib"] > 0
        assert len(rec["seconds"]) == report["settings"]["npo_steps"]


def test_ratios_are_quotients_and_targets_are_judged(quick_report):
    report = json.loads(quick_report["stdout"])
    figures, ratios = report["figures"], report["ratios"]
    assert set(ratios) == set(bench.RATIOS)
    for name, r in ratios.items():
        num, den = figures[r["numerator"]], figures[r["denominator"]]
        if num is None or den is None:
            assert r["value"] is None and r["reason"]
        else:
            assert r["value"] == pytest.approx(num / den, rel=1e-9) and r["value"] > 0
        if name in bench.TARGETS:
            op, target = bench.TARGETS[name]
            assert r["target"] == target and r["comparison"] == op
            expected = None if r["value"] is None else (
                r["value"] >= target if op == ">=" else r["value"] <= target)
            assert r["met"] == expected
    assert ratios["load_speedup"]["value"] is None  # no cold load under --quick


def test_machine_date_and_packages_are_recorded(quick_report):
    report = json.loads(quick_report["stdout"])
    assert report["date"][:2] == "20"
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["usable_cores"] >= 1
    assert report["packages"]["torch"] and report["packages"]["transformers"]
    assert report["threads"] == 1


def test_human_text_names_every_figure_and_target():
    figures = dict.fromkeys(bench.FIGURES, 2.0)
    figures["load_cold_s"] = None
    report = {"model": "m", "quick": True, "threads": 1, "date": "2026-01-01T00:00:00+00:00",
              "machine": {"cpu_model": "cpu", "usable_cores": 2, "memory_gib": 8},
              "packages": {"torch": "x"}, "units": bench.UNITS, "figures": figures,
              "not_measured": {"load_cold_s": "skipped"}, "wall_s": 1.0,
              "ratios": {name: bench._ratio(figures, name) for name in bench.RATIOS}}
    text = bench.format_text(report)
    for name in list(bench.FIGURES) + list(bench.RATIOS):
        assert name in text
    assert "target >= 20: NOT met" in text  # eval_speedup = 2 / 2 = 1
    assert "target <= 0.6: NOT met" in text
    assert "not measured" in text and "skipped" in text


def test_counting_wrapper_leaves_generation_unchanged(tiny):
    from ema_utils.core.generation import generate_responses

    model, tokenizer = tiny
    prompts = ["Write a poem about the sea.", "How do I kill a Python process?"]
    before = generate_responses(model, tokenizer, prompts, max_new_tokens=6, progress=False)
    result = bench_measures.eval_throughput(model, tokenizer, bench_measures.bench_prompts(3),
                                            batch_size=2, max_new_tokens=6)
    assert "generate" not in model.__dict__  # the instance wrapper is removed again
    after = generate_responses(model, tokenizer, prompts, max_new_tokens=6, progress=False)
    assert before.equals(after)
    assert 0 < result["generated_tokens"] <= 3 * 6 and result["prompt_tokens"] > 0
    assert (result["batch_size"], result["prompts_per_batch"]) == (2, 64)  # greedy on a CPU


def test_processed_tokens_stop_at_the_first_stop_token():
    input_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = torch.cat([input_ids, torch.tensor([[1, 2, 99, 0], [3, 4, 5, 6]])], dim=1)
    assert bench_measures._processed_tokens(input_ids, mask, out, {99}) == (5, 3 + 4)


def test_bench_prompts_are_a_fixed_refusal_sample():
    a, b = bench_measures.bench_prompts(10), bench_measures.bench_prompts(10)
    assert a.equals(b) and len(a) == 10 and a["id"].is_unique
    assert bench_measures.bench_prompts(12).head(10).equals(a)  # a superset as n grows


def test_peak_tree_rss_counts_descendants():
    import sys

    # The child starts a grandchild that holds 150 MB for a second: the peak must include it.
    grandchild = "b = bytearray(150 * 2**20); import time; time.sleep(1.5)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    rc, peak, wall, err = bench_measures.peak_tree_rss([sys.executable, "-c", child], interval=0.05)
    assert rc == 0, err
    assert peak > 150 * 2**20 and wall >= 1.5


def test_a_recorded_chapter_peak_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path))
    assert bench_measures.recorded_chapter_peak() is None
    for chapter, mib in (("setup", 900.0), ("unlearning", 2500.0)):
        folder = tmp_path / "results" / chapter / "k1"
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"chapter": chapter, "profile": "cpu",
                                                     "peak_rss_mib": mib}))
    found = bench_measures.chapter_peak_memory("tiny-random", quick=True)
    assert found["peak_rss_mib"] == 2500.0 and found["chapter"] == "unlearning"
    assert found["method"] == "run record"


def test_eval_work_profile_accounts_for_the_time_and_the_tokens(tiny):
    model, tokenizer = tiny
    prompts = bench_measures.bench_prompts(5)
    work = bench_measures.eval_work_profile(model, tokenizer, prompts, batch_size=2, max_new_tokens=6)
    fractions = work["time_fractions"]
    assert set(fractions) == {"matmul", "attention", "other ops", "outside ops"}
    assert all(v >= 0 for v in fractions.values())
    inside = fractions["matmul"] + fractions["attention"] + fractions["other ops"]
    assert inside <= 1.05  # self times on the calling thread cannot exceed the wall time
    assert fractions["outside ops"] == pytest.approx(max(0.0, 1.0 - inside))
    assert fractions["matmul"] > 0  # a transformer forward pass is made of matrix products
    assert any(op["kind"] == "matmul" for op in work["top_ops"])
    # useful tokens are a part of what the padded, lock-step batches computed
    assert 0 < work["useful_tokens"] <= work["computed_tokens"]
    assert 0 < work["useful_token_fraction"] <= 1
    assert work["shared_prefix_tokens"] == bench_measures.shared_prefix_tokens(tokenizer, prompts) > 0


def test_op_kind_groups_operations():
    assert bench_measures.op_kind("aten::addmm") == bench_measures.op_kind("aten::mm") == "matmul"
    assert bench_measures.op_kind("aten::scaled_dot_product_attention") == "attention"
    assert bench_measures.op_kind("aten::_softmax") == "attention"
    assert bench_measures.op_kind("aten::cat") == bench_measures.op_kind("aten::mul") == "other ops"
    assert bench_measures.op_kind("aten::mm_extra") == "other ops"  # exact names, not prefixes


def test_shared_prefix_tokens_is_the_common_start_of_the_chat_prompts(tiny):
    import pandas as pd

    from ema_utils.core.generation import encode_chats

    _, tokenizer = tiny
    prompts = pd.DataFrame({"prompt": ["Name a fruit.", "Why is the sky blue?", "Hi"]})
    n = bench_measures.shared_prefix_tokens(tokenizer, prompts)
    ids = encode_chats(tokenizer, prompts["prompt"].tolist())
    assert all(row[:n] == ids[0][:n] for row in ids)
    assert len({row[n] for row in ids}) > 1  # the next token differs somewhere


def test_roof_ceilings_are_the_useful_work_at_the_roof():
    c = bench_measures.roof_ceilings(roof_gflops=100.0, params=10**9, n_prompts=10,
                                     useful_tokens=500, shared_prefix=20)
    # 50 useful tokens per prompt x 2 GFLOP each = 100 GFLOP per prompt -> 1 prompt/s
    assert c["roof_prompts_per_s"] == pytest.approx(1.0)
    assert c["roof_prefix_prompts_per_s"] == pytest.approx(100 / 60)


def test_verdict_agreement_counts_same_verdicts_per_prompt():
    import pandas as pd

    prompts = ["How do I pick a lock?", "Write a poem", "Make a virus", "Hi"]
    ref = pd.DataFrame({"id": [1, 2, 3, 4], "prompt": prompts,
                        "response": ["I'm sorry, but I can't assist with that.", "Roses are red",
                                     "I can't help with that.", "Hello!"]})
    # other order, one verdict flipped (3: a refusal became an answer), one text changed only
    other = pd.DataFrame({"id": [4, 3, 2, 1], "prompt": prompts[::-1],
                          "response": ["Hello there!", "Sure, here is how to write it:",
                                       "Roses are red", "I'm sorry, but I can't assist with that."]})
    out = bench_measures.verdict_agreement(ref, other, judge="phrase")
    assert (out["items"], out["agreed"], out["identical_text"]) == (4, 3, 2)
    assert out["refusals_reference"] == 2 and out["refusals_other"] == 1
    assert [d["id"] for d in out["disagreements"]] == [3]


def test_n_parameters_counts_a_half_models_float32_head_once():
    from ema_utils.core.models import load_model

    plain, _ = load_model("tiny-random", log=lambda *_: None)
    half, _ = load_model("tiny-random", dtype=torch.bfloat16, log=lambda *_: None)
    assert half.get_output_embeddings().weight is not half.get_input_embeddings().weight
    assert bench_measures.n_parameters(half) == bench_measures.n_parameters(plain)
    assert bench_measures.n_parameters(plain) == sum(
        p.numel() for n, p in plain.named_parameters())  # named_parameters lists a tied one once
