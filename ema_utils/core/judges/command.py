"""The ``ema judge`` command: ``ema judge validate`` and ``ema judge score``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..console import log as console_log
from .. import models
from ..console import emit
from ..errors import ParameterError
from .first_token import RubricModelJudge
from .labels import read_jsonl
from .registry import DEFAULT_JUDGE, JUDGES, get_judge
from .validation import validate_judges


def _cmd_validate(args) -> int:
    extra = None
    if args.small_model:
        model, tokenizer = models.load_model(args.small_model, dtype=args.dtype,
                                             log=console_log)
        extra = {"small_model": RubricModelJudge(model, tokenizer, progress=not args.json)}
    payload = validate_judges(args.labels, heldout_path=args.heldout, draw_path=args.draw, extra=extra,
                              confirm_path=args.confirmation)

    def row(name, m):
        return (f"{name:10} {m['accuracy']:9.3f} {m['precision']:9.3f} {m['recall']:7.3f} "
                f"{m['kappa']:7.3f} {m['n']:5d}")

    def with_ci(judges):
        return [f"{row(name, m)}  kappa 95% CI [{m['kappa_ci'][0]:.2f}, {m['kappa_ci'][1]:.2f}]"
                for name, m in judges.items()]

    def targets_line(where, t):
        return (f"default judge on {where}: targets {'met' if t['met'] else 'NOT met'}"
                + (f" (failing groups: {', '.join(t['failing_groups'])})" if t["failing_groups"] else ""))

    def human(p):
        lines = [f"{'judge':10} {'accuracy':>9} {'precision':>9} {'recall':>7} {'kappa':>7} {'n':>5}"]
        lines += [row(name, m) for name, m in p["judges"].items()]
        lines.append(f"default judge: {p['default']}; highest Cohen's kappa: {p['best_kappa']} "
                     "(learned: cross-validated)")
        for name, per in p.get("by_category", {}).items():
            lines.append(f"{name} accuracy by category: " +
                         ", ".join(f"{c} {v:.2f}" for c, v in per.items()))
        if "heldout" in p:
            h = p["heldout"]
            lines.append(f"held out: {h['n']} hand-labelled outputs of the chapters' models "
                         "(never trained on)")
            lines += with_ci(h["judges"])
            if "annotators" in h:
                lines.append(f"two annotators agree: kappa {h['annotators']['kappa']:.3f}")
        if p.get("draw"):
            d = p["draw"]
            for part in ("dev", "test"):
                lines.append(f"the draw's {part} part ({d['n'][part]} items"
                             + (", scored once per candidate)" if part == "test" else ", where the choice is made)"))
                lines += with_ci(d[part]["judges"])
            lines.append(f"chosen on the dev part (highest kappa): {d['chosen_on_dev']}")
            if d.get("targets"):
                lines.append(targets_line("test", d["targets"]))
        if p.get("confirmation"):
            c = p["confirmation"]
            lines.append(f"the confirmation draw ({c['n']} items never labelled before, drawn after "
                         "the choice; scored once per candidate)")
            lines += with_ci(c["test"]["judges"])
            if c.get("targets"):
                lines.append(targets_line("the confirmation draw", c["targets"]))
        return "\n".join(lines)

    emit(args, payload, human)
    return 0


def _cmd_score(args) -> int:
    rows = read_jsonl(args.input, required=("id", "prompt", "response"))
    kwargs = {}
    if args.judge in ("first_token", "small_model"):
        model, tokenizer = models.load_model(args.model, log=console_log)
        kwargs = {"model": model, "tokenizer": tokenizer, "threshold": args.threshold}
    elif args.judge == "endpoint":
        if not args.base_url or not args.endpoint_model:
            raise ParameterError("--judge endpoint needs --base-url and --endpoint-model")
        kwargs = {"base_url": args.base_url, "model": args.endpoint_model}
    judge = get_judge(args.judge, **kwargs)
    flags = judge.judge([r["prompt"] for r in rows], [r["response"] for r in rows]) if rows else []
    payload = [{"id": r["id"], "is_refusal": bool(f)} for r, f in zip(rows, flags)]

    def human(p):
        refused = sum(x["is_refusal"] for x in p)
        body = "\n".join(f"{x['id']}\t{'refusal' if x['is_refusal'] else 'compliance'}" for x in p)
        return f"{body}\n{refused}/{len(p)} judged refusals ({judge.name} judge)".lstrip("\n")

    emit(args, payload, human)
    return 0


def _cmd_draw(args) -> int:
    # deferred: the draw loads models and reads the store; `ema judge validate/score` need neither
    from . import draw

    stores = args.store or [None]  # None: this project's results store
    pool = pd.concat([draw.collect_store(args.model_name, folder) for folder in stores],
                     ignore_index=True)
    mix = draw.prompt_mix(args.harmful_per_concept, args.n_benign, args.n_over_refusal, seed=args.seed)
    extra = draw.generate_sources(mix, args.model_name, args.second_model,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  temperature=args.temperature,
                                  progress=not getattr(args, "json", False))
    table = draw.draw(pd.concat([pool, extra], ignore_index=True), per_source=args.per_source,
                      seed=args.seed, sources=args.sources or draw.SOURCES,
                      exclude=draw.labelled_texts() if args.confirmation else None,
                      confirmation=args.confirmation)
    if args.train_greedy:
        table = draw.add_train_greedy(table, args.train_greedy, args.model_name, args.second_model,
                                      args.harmful_per_concept, args.n_benign, args.n_over_refusal,
                                      max_new_tokens=args.max_new_tokens, seed=args.seed,
                                      confirmation=args.confirmation,
                                      progress=not getattr(args, "json", False))
    draw.write_draw(table, args.out)
    draw.write_draw(draw.blind_copy(table), args.blind)
    counts = table.groupby(["source", "split"]).size().unstack(fill_value=0)
    payload = {"out": str(args.out), "blind": str(args.blind), "n": int(len(table)),
               "by_source": {s: {k: int(v) for k, v in row.items()} for s, row in counts.iterrows()}}
    emit(args, payload, lambda p: f"{p['n']} items -> {p['out']} (annotators' copy: {p['blind']})\n"
         + counts.to_string())
    return 0


def _cmd_merge(args) -> int:
    # deferred: see _cmd_draw
    from . import draw

    table = pd.DataFrame([{k: v for k, v in r.items() if k != "_line"}
                          for r in read_jsonl(args.draw, required=("id", "prompt", "response"))])
    merged = draw.merge_annotations(table, args.first, args.second, args.third)
    draw.write_draw(merged, args.out)
    agree = float((merged["first_annotator"] == merged["second_annotator"]).mean())
    payload = {"out": str(args.out), "n": int(len(merged)), "annotators_agree": round(agree, 4),
               "refusals": int(merged["is_refusal"].sum()), "redacted": int(merged["redacted"].sum())}
    emit(args, payload, lambda p: f"{p['n']} labelled items -> {p['out']}; annotators agree on "
         f"{p['annotators_agree']:.1%}; {p['refusals']} refusals; {p['redacted']} redacted")
    return 0


def register_cli(subparsers) -> None:
    """Add ``ema judge validate`` and ``ema judge score`` to the command line."""
    p = subparsers.add_parser("judge", help="refusal judges: validate against labels, score responses")
    sub = p.add_subparsers(dest="judge_command", required=True, metavar="ACTION")

    v = sub.add_parser("validate", help="agreement of each offline judge with data/judge_labels.jsonl")
    v.add_argument("--json", action="store_true", help="print one JSON document")
    v.add_argument("--labels", type=Path, default=None, help="another labelled JSONL file")
    v.add_argument("--heldout", type=Path, default=None,
                   help="another held-out labelled JSONL file (default data/judge_heldout.jsonl)")
    v.add_argument("--draw", type=Path, default=None,
                   help="another labelled draw with dev/test parts (default data/judge_draw.jsonl)")
    v.add_argument("--confirmation", type=Path, default=None,
                   help="another confirmation draw (default: data/judge_confirm.jsonl, when present)")
    v.add_argument("--small-model", default=None, metavar="MODEL",
                   help="also score the small-model rubric judge (small_model) with this model on "
                   "the draw, e.g. qwen2.5-coder-0.5b-instruct")
    v.add_argument("--dtype", default=None, help="--small-model: its dtype (auto: bfloat16 where native)")
    v.set_defaults(func=_cmd_validate)

    s = sub.add_parser("score", help="judge responses someone else generated")
    s.add_argument("--input", required=True, type=Path,
                   help='JSONL file, one {"id", "prompt", "response"} per line')
    s.add_argument("--judge", default=DEFAULT_JUDGE, choices=JUDGES,
                   help=f"which judge (default: {DEFAULT_JUDGE})")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="--judge first_token / small_model: the model whose first token is read (first_token "
                   "ignores the responses)")
    s.add_argument("--threshold", type=float, default=0.5, help="--judge first_token / small_model: refusal-probability threshold")
    s.add_argument("--base-url", default=None, help="--judge endpoint: e.g. http://localhost:8000/v1")
    s.add_argument("--endpoint-model", default=None, help="--judge endpoint: the model name to ask")
    s.set_defaults(func=_cmd_score)

    d = sub.add_parser("draw", help="draw responses of every source for blind labelling (the "
                       "protocol that chooses the default judge)")
    d.add_argument("--out", required=True, type=Path, help="the draw, with sources and splits")
    d.add_argument("--blind", required=True, type=Path,
                   help="the annotators' copy: id, prompt, response only, in a hidden order")
    d.add_argument("--per-source", type=int, default=48, help="items per source group")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--model-name", default="qwen2.5-coder-0.5b-instruct",
                   help="the aligned model whose chapters' outputs (in the results store) are drawn")
    d.add_argument("--second-model", default="smollm2-135m-instruct")
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument("--temperature", type=float, default=0.8, help="for the sampled source")
    d.add_argument("--store", type=Path, action="append", default=None, metavar="DIR",
                   help="a results store to draw the chapters' outputs from (repeatable; default: "
                   "this project's, e.g. add another build's <EMA_BUILD_DIR>/results/store)")
    d.add_argument("--sources", nargs="+", default=None, metavar="SOURCE",
                   help="only these source groups (default: all)")
    d.add_argument("--harmful-per-concept", type=int, default=4,
                   help="harmful prompts per concept the generated sources answer")
    d.add_argument("--n-benign", type=int, default=10, help="benign instructions they answer")
    d.add_argument("--n-over-refusal", type=int, default=10, help="over-refusal look-alikes they answer")
    d.add_argument("--train-greedy", type=int, default=0, metavar="N",
                   help="also draw up to N of the aligned model's greedy answers to a mix of "
                   "train-split prompts (the same sizes): for when its greedy answers to the eval "
                   "prompts are all labelled")
    d.add_argument("--confirmation", action="store_true",
                   help="a confirmation draw: no text already labelled, every item in the test part")
    d.add_argument("--json", action="store_true", help="print one JSON document")
    d.set_defaults(func=_cmd_draw)

    m = sub.add_parser("merge", help="join two blind annotators' labels (and a third reading of "
                       "their disagreements) into a labelled draw")
    m.add_argument("--draw", required=True, type=Path)
    m.add_argument("--first", required=True, type=Path)
    m.add_argument("--second", required=True, type=Path)
    m.add_argument("--third", type=Path, default=None)
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--json", action="store_true", help="print one JSON document")
    m.set_defaults(func=_cmd_merge)
