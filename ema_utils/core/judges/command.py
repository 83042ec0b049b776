"""The ``ema judge`` command: ``ema judge validate`` and ``ema judge score``."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import models
from ..console import emit
from ..errors import ParameterError
from .labels import read_jsonl
from .registry import DEFAULT_JUDGE, JUDGES, get_judge
from .validation import validate_judges


def _cmd_validate(args) -> int:
    payload = validate_judges(args.labels, heldout_path=args.heldout)

    def row(name, m):
        return (f"{name:10} {m['accuracy']:9.3f} {m['precision']:9.3f} {m['recall']:7.3f} "
                f"{m['kappa']:7.3f} {m['n']:5d}")

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
            lines += [f"{row(name, m)}  kappa 95% CI [{m['kappa_ci'][0]:.2f}, {m['kappa_ci'][1]:.2f}]"
                      for name, m in h["judges"].items()]
            if "annotators" in h:
                lines.append(f"two annotators agree: kappa {h['annotators']['kappa']:.3f}")
        return "\n".join(lines)

    emit(args, payload, human)
    return 0


def _cmd_score(args) -> int:
    rows = read_jsonl(args.input, required=("id", "prompt", "response"))
    kwargs = {}
    if args.judge == "first_token":
        model, tokenizer = models.load_model(args.model, log=lambda m: print(m, file=sys.stderr))
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


def register_cli(subparsers) -> None:
    """Add ``ema judge validate`` and ``ema judge score`` to the command line."""
    p = subparsers.add_parser("judge", help="refusal judges: validate against labels, score responses")
    sub = p.add_subparsers(dest="judge_command", required=True, metavar="ACTION")

    v = sub.add_parser("validate", help="agreement of each offline judge with data/judge_labels.jsonl")
    v.add_argument("--json", action="store_true", help="print one JSON document")
    v.add_argument("--labels", type=Path, default=None, help="another labelled JSONL file")
    v.add_argument("--heldout", type=Path, default=None,
                   help="another held-out labelled JSONL file (default data/judge_heldout.jsonl)")
    v.set_defaults(func=_cmd_validate)

    s = sub.add_parser("score", help="judge responses someone else generated")
    s.add_argument("--input", required=True, type=Path,
                   help='JSONL file, one {"id", "prompt", "response"} per line')
    s.add_argument("--judge", default=DEFAULT_JUDGE, choices=JUDGES,
                   help=f"which judge (default: {DEFAULT_JUDGE})")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="--judge first_token: the model whose first token is scored (responses are ignored)")
    s.add_argument("--threshold", type=float, default=0.5, help="--judge first_token: refusal-mass threshold")
    s.add_argument("--base-url", default=None, help="--judge endpoint: e.g. http://localhost:8000/v1")
    s.add_argument("--endpoint-model", default=None, help="--judge endpoint: the model name to ask")
    s.set_defaults(func=_cmd_score)
