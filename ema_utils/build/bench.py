"""`ema bench`: how well the companion uses the machine, measured in one run on one machine.

Every figure comes from its own function in :mod:`ema_utils.build.bench_measures`, whose docstring
says exactly what is timed.
The figures are put side by side with the machine's fp32 matmul throughput (the roof) and with
naive implementations, and the ratios are set against the targets of the performance issue:

============================ ============================================= ==========
ratio                         what                                          target
============================ ============================================= ==========
eval_speedup                  generate_responses in the compute dtype /     >= 20
                              the fp32 one-prompt-at-a-time loop
eval_roof_fraction            model FLOP/s of generate_responses / the      >= 0.6
                              matmul roof of the compute dtype
eval_dtype_speedup            generate_responses, compute dtype / fp32      (reported)
prefix_cache_speedup          ... with the shared prefix cached / without   (reported)
bf16_roof_ratio               bf16 matmul roof / fp32 matmul roof           (reported)
verdict_agreement             per-prompt refusal verdicts of the fastest    >= 0.97
                              setting vs plain fp32, on the same prompts
naive_roof_fraction           model FLOP/s of the naive loop / fp32 roof    (reported)
npo_step_speedup              naive two-copy fp32 step / ema_utils' step    (reported)
npo_dtype_speedup             ema_utils' fp32 step / its compute-dtype step (reported)
npo_memory_fraction           peak RSS growth ema_utils / naive two-copy    <= 0.6
npo_total_memory_fraction     the same for the whole process's peak RSS     (reported)
load_speedup                  cold (GGUF de-quantization) / cached load     >= 10
eval_speedup_ceiling          same work at 100% of the roof / naive loop    (reported)
eval_speedup_ceiling_prefix   ... with the shared chat prefix done once     (reported)
============================ ============================================= ==========

The compute dtype is the one the chapters run in: ``models.resolve_dtype("auto")``, bfloat16
where the CPU (AVX512-BF16, AMX) or GPU multiplies it natively, else float32 (then the dtype
ratios are 1 and the agreement is trivially 1). The naive loop always runs in float32: it is
the baseline the issue's targets are stated against.

Where a target is missed, :func:`~ema_utils.build.bench_measures.eval_work_profile` says why: it runs
the evaluation again under ``torch.profiler`` and splits the wall time into matrix products,
attention, other tensor operations and time outside any tensor operation (Python, the generate
loop), and it counts the tokens the batches compute against the tokens that are useful
(padding, rows that have already stopped). The two ceilings turn the useful work into the best speedup any
implementation could reach on this machine without doing less work.

A target that is not reached is still printed, with its measured value and ``met: false``.
Model FLOPs are counted as 2 x parameters per processed token (prompt tokens without padding
plus generated tokens up to and including the stop token).

Use ``ema bench [--json] [--model M] [--quick]``; ``--quick`` runs small sizes (under a minute on
tiny-random) and skips the cold load and the chapter run.
"""

from __future__ import annotations

import gc
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from ..core.cache import atomic_write_json
from ..core.console import emit
from ..core.models import DEFAULT_MODEL, float32_output_head, resolve_dtype
from ..core.paths import bench_report_file
from .bench_measures import (
    bench_log,
    bench_prompts,
    chapter_peak_memory,
    eval_throughput,
    eval_work_profile,
    first_token_throughput,
    load_times,
    matmul_gflops,
    n_parameters,
    naive_eval_throughput,
    npo_step,
    roof_ceilings,
    verdict_agreement,
)
from .book import format_figure
from .orchestrate import get_profile, machine_info, package_versions

TARGETS = {
    "eval_speedup": (">=", 20.0),
    "eval_roof_fraction": (">=", 0.6),
    "verdict_agreement": (">=", 0.97),
    "load_speedup": (">=", 10.0),
    "npo_memory_fraction": ("<=", 0.6),
}
"""Ratio -> (comparison, target), from the performance issue (targets on a 2-core machine)."""

RATIOS = {
    # name: (numerator figure, denominator figure, what it says)
    "eval_speedup": ("eval_prompts_per_s", "naive_prompts_per_s",
                     "generate_responses prompts/s in the compute dtype over the fp32 "
                     "one-prompt-at-a-time loop"),
    "eval_roof_fraction": ("eval_model_gflops", "compute_roof_gflops",
                           "generate_responses model FLOP/s as a fraction of the matmul roof of "
                           "the dtype it computes in"),
    "eval_dtype_speedup": ("eval_no_prefix_prompts_per_s", "eval_fp32_prompts_per_s",
                           "generate_responses prompts/s in the compute dtype over the same "
                           "call in fp32 (both without the prefix cache)"),
    "prefix_cache_speedup": ("eval_prompts_per_s", "eval_no_prefix_prompts_per_s",
                             "generate_responses prompts/s with the shared chat prefix computed "
                             "once over the same call without (compute dtype)"),
    "bf16_roof_ratio": ("matmul_bf16_gflops", "matmul_gflops",
                        "the bf16 matmul roof over the fp32 one"),
    "verdict_agreement": ("verdict_agreed", "verdict_items",
                          "share of prompts whose refusal verdict (default judge) is the same "
                          "in the compute dtype as in fp32"),
    "naive_roof_fraction": ("naive_model_gflops", "matmul_gflops",
                            "the naive loop's model FLOP/s as a fraction of the matmul roof"),
    "npo_step_speedup": ("npo_naive_s_per_step", "npo_lora_s_per_step",
                         "naive two-copy fp32 NPO step time over ema_utils' step time"),
    "npo_dtype_speedup": ("npo_lora_fp32_s_per_step", "npo_lora_s_per_step",
                          "ema_utils' NPO step in fp32 over the same step with the base model "
                          "in the compute dtype (LoRA weights, optimizer and loss in fp32)"),
    "npo_memory_fraction": ("npo_lora_peak_growth_mib", "npo_naive_peak_growth_mib",
                            "ema_utils' NPO peak RSS growth as a fraction of the naive one's"),
    "npo_total_memory_fraction": ("npo_lora_peak_rss_mib", "npo_naive_peak_rss_mib",
                                  "the same for the whole process's peak RSS (the resident "
                                  "model both need included)"),
    "load_speedup": ("load_cold_s", "load_cached_s",
                     "cold (GGUF de-quantization) load time over the cached load time"),
    "eval_speedup_ceiling": ("eval_roof_prompts_per_s", "naive_prompts_per_s",
                             "the useful work of the evaluation at 100% of the matmul roof, over "
                             "the naive loop: no implementation doing this work beats it here"),
    "eval_speedup_ceiling_prefix": ("eval_roof_prefix_prompts_per_s", "naive_prompts_per_s",
                                    "the same ceiling if the chat template's shared prefix were "
                                    "computed once instead of once per prompt"),
}

UNITS = {
    "matmul_gflops": "GFLOP/s", "matmul_bf16_gflops": "GFLOP/s", "compute_roof_gflops": "GFLOP/s",
    "eval_prompts_per_s": "prompts/s", "eval_fp32_prompts_per_s": "prompts/s",
    "eval_no_prefix_prompts_per_s": "prompts/s",
    "verdict_agreed": "prompts", "verdict_items": "prompts", "npo_lora_fp32_s_per_step": "s/step", "eval_tokens_per_s": "tokens/s",
    "eval_model_gflops": "GFLOP/s", "naive_prompts_per_s": "prompts/s",
    "naive_tokens_per_s": "tokens/s", "naive_model_gflops": "GFLOP/s",
    "first_token_prompts_per_s": "prompts/s", "npo_lora_s_per_step": "s/step",
    "npo_lora_peak_growth_mib": "MiB", "npo_lora_peak_rss_mib": "MiB",
    "npo_naive_s_per_step": "s/step", "npo_naive_peak_growth_mib": "MiB",
    "npo_naive_peak_rss_mib": "MiB", "load_cold_s": "s", "load_cached_s": "s",
    "chapter_peak_rss_mib": "MiB",
    "eval_roof_prompts_per_s": "prompts/s", "eval_roof_prefix_prompts_per_s": "prompts/s",
    "eval_useful_token_fraction": "fraction", "eval_matmul_time_fraction": "fraction",
    "eval_outside_ops_time_fraction": "fraction", "shared_prefix_tokens": "tokens",
}
FIGURES = tuple(UNITS)
"""Every figure `ema bench --json` reports (a value, or null with a reason in not_measured)."""


# --- the run's settings and machine -------------------------------------------------------------

def _settings(quick: bool) -> dict:
    """Sizes of each measurement. Eval batch size and max_new_tokens come from the cpu profile's
    setup block; NPO batch size and LoRA rank from UnlearnConfig (the cpu profile sets neither)."""
    # deferred: trainer imports torch (heavy); only the NPO settings need it
    from ..methods.trainer import UnlearnConfig

    setup = get_profile("cpu").get("setup", {})
    unlearn = {**get_profile("cpu").get("common", {}), **get_profile("cpu").get("unlearning", {})}
    defaults = UnlearnConfig()
    return {
        "matmul_n": 1024 if quick else 2048,
        "matmul_repeats": 3 if quick else 5,
        "eval_batch_size": int(setup.get("batch_size", 16)),
        "eval_max_new_tokens": int(setup.get("max_new_tokens", 32)),
        "eval_prompts": 16 if quick else 32,
        "naive_prompts": 4 if quick else 8,
        "first_token_prompts": 16 if quick else 32,
        "npo_batch_size": int(unlearn.get("batch_size", defaults.batch_size)),
        "npo_lora_r": int(unlearn.get("lora_r", defaults.lora_r)),
        "npo_lora_alpha": float(unlearn.get("lora_alpha", defaults.lora_alpha)),
        "npo_lr": float(unlearn.get("npo_lr", defaults.lr)),
        "npo_steps": 2 if quick else 4,  # the first is a warm-up, not counted
    }


def machine_record() -> dict:
    """Date, machine (cores, memory, processor) and package versions of this run."""
    info = machine_info()
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"machine": {**info, "cpu_model": cpu, "usable_cores": cores,
                        "load_average_1m": None if load is None else round(load[0], 2)},
            "packages": {**package_versions(), "python": platform.python_version()}}


# --- the whole bench ----------------------------------------------------------------------------

def _ratio(figures: dict, name: str) -> dict:
    num, den, what = RATIOS[name]
    a, b = figures.get(num), figures.get(den)
    value = a / b if a is not None and b not in (None, 0) else None
    entry = {"value": value, "numerator": num, "denominator": den, "what": what}
    if name in TARGETS:
        op, target = TARGETS[name]
        entry.update({"target": target, "comparison": op,
                      "met": None if value is None else (value >= target if op == ">="
                                                         else value <= target)})
    if value is None:
        entry["reason"] = f"{num if a is None else den} was not measured"
    return entry


def run_bench(model_name: str | None = None, quick: bool = False) -> dict:
    """Every measurement, in order, on this machine; returns the `ema bench --json` document."""
    # deferred: torch loads only when the bench runs (not for `ema --help`)
    import torch

    model_name = model_name or DEFAULT_MODEL
    settings = _settings(quick)
    threads = torch.get_num_threads()
    started = datetime.now(timezone.utc)
    figures: dict = dict.fromkeys(FIGURES)
    not_measured: dict = {}
    details: dict = {}

    compute = resolve_dtype("auto", log=bench_log)
    compute_name = str(compute).removeprefix("torch.")
    for dtype, key in (("float32", "matmul_gflops"), ("bfloat16", "matmul_bf16_gflops")):
        bench_log(f"matmul roof ({settings['matmul_n']}^2 {dtype}, {threads} threads)")
        details[key] = matmul_gflops(settings["matmul_n"], settings["matmul_repeats"], dtype)
        figures[key] = details[key]["gflops"]
    figures["compute_roof_gflops"] = (figures["matmul_bf16_gflops"] if compute_name == "bfloat16"
                                      else figures["matmul_gflops"])
    details["compute_dtype"] = compute_name

    bench_log(f"load times of {model_name}")
    details["load"], model, tokenizer = load_times(model_name, quick)
    figures["load_cold_s"], figures["load_cached_s"] = details["load"]["cold_s"], details["load"]["cached_s"]
    if details["load"]["cold_skipped"]:
        not_measured["load_cold_s"] = details["load"]["cold_skipped"]

    prompts = bench_prompts(max(settings["eval_prompts"], settings["first_token_prompts"]))
    eval_prompts = prompts.head(settings["eval_prompts"])
    responses: list = []
    bench_log(f"evaluation: generate_responses on {settings['eval_prompts']} prompts (float32, "
              "no prefix cache)")
    details["eval_fp32"] = eval_throughput(model, tokenizer, eval_prompts,
                                           settings["eval_batch_size"],
                                           settings["eval_max_new_tokens"], responses,
                                           prefix_cache=False)
    figures["eval_fp32_prompts_per_s"] = details["eval_fp32"]["prompts_per_s"]
    bench_log(f"evaluation: naive loop on {settings['naive_prompts']} prompts (float32)")
    details["naive_eval"] = naive_eval_throughput(model, tokenizer,
                                                  prompts.head(settings["naive_prompts"]),
                                                  settings["eval_max_new_tokens"])
    model.to(compute)
    float32_output_head(model)  # as models.load_model computes in a half dtype
    bench_log(f"evaluation: generate_responses on {settings['eval_prompts']} prompts "
              f"({compute_name}, no prefix cache)")
    details["eval_no_prefix"] = eval_throughput(model, tokenizer, eval_prompts,
                                                settings["eval_batch_size"],
                                                settings["eval_max_new_tokens"], prefix_cache=False)
    bench_log(f"evaluation: generate_responses on {settings['eval_prompts']} prompts "
              f"({compute_name}, prefix cache): the fastest setting")
    details["eval"] = eval_throughput(model, tokenizer, eval_prompts, settings["eval_batch_size"],
                                      settings["eval_max_new_tokens"], responses)
    # the fastest setting's verdicts against the plain fp32 path's, prompt by prompt
    details["verdicts"] = verdict_agreement(responses[0], responses[-1])
    figures["eval_no_prefix_prompts_per_s"] = details["eval_no_prefix"]["prompts_per_s"]
    figures["verdict_agreed"] = float(details["verdicts"]["agreed"])
    figures["verdict_items"] = float(details["verdicts"]["items"])
    for prefix, key in (("eval", "eval"), ("naive", "naive_eval")):
        figures[f"{prefix}_prompts_per_s"] = details[key]["prompts_per_s"]
        figures[f"{prefix}_tokens_per_s"] = details[key]["tokens_per_s"]
        figures[f"{prefix}_model_gflops"] = details[key]["model_gflops"]
    details["parameters"] = n_parameters(model)
    bench_log(f"evaluation again under torch.profiler ({settings['eval_prompts']} prompts, "
              f"{compute_name})")
    work = eval_work_profile(model, tokenizer, eval_prompts,
                             settings["eval_batch_size"], settings["eval_max_new_tokens"])
    details["eval_profile"] = work
    ceilings = roof_ceilings(figures["compute_roof_gflops"], details["parameters"], work["prompts"],
                             work["prompt_work_tokens"], work["shared_prefix_tokens"])
    figures["eval_roof_prompts_per_s"] = ceilings["roof_prompts_per_s"]
    figures["eval_roof_prefix_prompts_per_s"] = ceilings["roof_prefix_prompts_per_s"]
    figures["eval_useful_token_fraction"] = work["useful_token_fraction"]
    figures["eval_matmul_time_fraction"] = work["time_fractions"]["matmul"]
    figures["eval_outside_ops_time_fraction"] = work["time_fractions"]["outside ops"]
    figures["shared_prefix_tokens"] = float(work["shared_prefix_tokens"])

    bench_log(f"first-token scoring on {settings['first_token_prompts']} prompts ({compute_name})")
    details["first_token"] = first_token_throughput(
        model, tokenizer, prompts.head(settings["first_token_prompts"]), settings["eval_batch_size"])
    figures["first_token_prompts_per_s"] = details["first_token"]["prompts_per_s"]
    del model, tokenizer
    gc.collect()

    forget = prompts.head(settings["npo_batch_size"] * settings["npo_steps"])
    variants = [("lora", "lora", compute_name), ("naive", "naive", "float32")]
    if compute_name != "float32":
        variants.insert(1, ("lora_fp32", "lora", "float32"))
    for label, variant, dtype in variants:
        bench_log(f"NPO step ({variant}, {dtype}) in a child process")
        rec = npo_step(model_name, variant, forget, settings, threads, dtype=dtype)
        details[f"npo_{label}"] = rec
        figures[f"npo_{label}_s_per_step"] = rec["s_per_step"]
        if label != "lora_fp32":
            figures[f"npo_{label}_peak_growth_mib"] = rec["peak_growth_mib"]
            figures[f"npo_{label}_peak_rss_mib"] = rec["peak_rss_mib"]
    if compute_name == "float32":
        figures["npo_lora_fp32_s_per_step"] = figures["npo_lora_s_per_step"]

    bench_log("peak memory of a chapter run")
    details["chapter"] = chapter_peak_memory(model_name, quick)
    figures["chapter_peak_rss_mib"] = details["chapter"].get("peak_rss_mib")
    if figures["chapter_peak_rss_mib"] is None:
        not_measured["chapter_peak_rss_mib"] = details["chapter"]["reason"]

    ratios = {name: _ratio(figures, name) for name in RATIOS}
    return {
        "date": started.isoformat(timespec="seconds"),
        "model": model_name, "quick": quick, "threads": threads, "compute_dtype": compute_name,
        **machine_record(),
        "settings": settings,
        "units": UNITS,
        "figures": figures,
        "ratios": ratios,
        "not_measured": not_measured,
        "details": details,
        "wall_s": (datetime.now(timezone.utc) - started).total_seconds(),
    }


def format_text(report: dict) -> str:
    """The human-readable form of :func:`run_bench`'s document."""
    m = report["machine"]
    lines = [f"ema bench: {report['model']} on {m.get('cpu_model')} ({m.get('usable_cores')} cores, "
             f"{m.get('memory_gib')} GiB), torch {report['packages'].get('torch')}, "
             f"{report['threads']} threads, compute dtype "
             f"{report.get('compute_dtype', 'float32')}, {report['date']}"
             + (" [--quick]" if report["quick"] else ""), "", "figures:"]
    for name, value in report["figures"].items():
        line = f"  {name:28} {format_figure(value):>12} {report['units'][name]}"
        if value is None:
            line = f"  {name:28} {'not measured':>12}  ({report['not_measured'].get(name, '')})"
        lines.append(line)
    lines += ["", "ratios:"]
    for name, r in report["ratios"].items():
        line = f"  {name:28} {format_figure(r['value']):>12}  = {r['numerator']} / {r['denominator']}"
        if "target" in r:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[r["met"]]
            line += f"   target {r['comparison']} {r['target']:g}: {verdict}"
        lines.append(line)
    lines.append(f"\nbench took {report['wall_s']:.0f} s")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    if args.dtype_check:
        # deferred: the check trains and scores through the chapters' machinery (torch)
        from .dtype_check import check_compute_dtype, render_markdown

        report = check_compute_dtype(args.profile, args.model)
        emit(args, report, render_markdown)
        return 0 if report["holds"] is not False else 1
    if args.screening:
        # deferred: the check trains and scores through the chapters' machinery (torch)
        from .screening import check_screening, render_markdown as render_screening

        report = check_screening(args.profile, args.model)
        emit(args, report, render_screening)
        return 0
    report = run_bench(args.model, quick=args.quick)
    if not args.quick:  # the book shows the last full run, with its date and machine
        atomic_write_json(bench_report_file(), report)
    emit(args, report, format_text)
    return 0



def register_cli(sub) -> None:
    p = sub.add_parser("bench", help="measure throughput, memory and load times against targets")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--model", help="registry name, hub id or local folder (default: the default model)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (under a minute on tiny-random); skips the cold load and "
                        "the chapter run")
    p.add_argument("--dtype-check", action="store_true",
                   help="instead of the throughput bench: check on a profile's own items that "
                        "the fast compute dtype (bf16) gives fp32's verdicts (aligned model, one "
                        "NPO adapter, NPO trained in both); exits 1 when it does not")
    p.add_argument("--screening", action="store_true",
                   help="instead of the throughput bench: measure on a profile's NPO run whether "
                        "the first-token refusal score agrees with the generated verdict at every "
                        "checkpoint (could checkpoints be screened without generating?)")
    p.add_argument("--profile", default="cpu",
                   help="the profile whose settings --dtype-check and --screening use")
    p.set_defaults(func=cmd_bench)

