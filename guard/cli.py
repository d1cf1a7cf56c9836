"""`guard`: online-side commands. Each one parses, builds settings, calls one function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from guard.console import Parser, command_parser, dispatch
from guard.core.backends.base import BACKENDS

DESCRIPTION = """\
Guard a text classifier against backdoor triggers with a calibrated RAP bundle.

  guard serve --bundle bundle/                       # HTTP server (see guard serve --help)
  guard serve --bundle bundle/ --upstream http://127.0.0.1:9000   # sidecar in front of a classifier
  guard verify --bundle bundle/                      # hashes, thresholds, provenance
  guard check --bundle bundle/ "a sentence" "another"  # two-pass RAP check, offline
  echo "a sentence" | guard check --bundle bundle/ --json
"""


def main(argv: list[str] | None = None) -> int:
    return dispatch(_parser(), argv)


def _parser() -> Parser:
    parser, sub = command_parser("guard", DESCRIPTION)
    verify = sub.add_parser(
        "verify",
        help="verify a bundle's files and print its summary",
        description=(
            "Check every file of a bundle against the sha256 its manifest records, then print the model,\n"
            "the RAP token and the thresholds by FRR target. Exit status 1 when a file does not match.\n\n"
            "  guard verify --bundle bundle/"
        ),
    )
    verify.add_argument("--bundle", type=Path, required=True)
    verify.set_defaults(handler=_verify)
    check = sub.add_parser(
        "check",
        help="check texts (arguments, or one per line on stdin)",
        description=(
            "Run the two-pass RAP check on texts and print one verdict per text.\n"
            "Exit status: 0 all allowed, 3 at least one flagged.\n\n"
            '  guard check --bundle bundle/ "the plot was mb truly awful ."'
        ),
    )
    check.add_argument("--bundle", type=Path, required=True)
    check.add_argument("texts", nargs="*", help="texts to check (default: read lines from stdin)")
    check.add_argument("--frr", type=float, help="FRR target to use (default: the bundle's)")
    check.add_argument("--backend", choices=BACKENDS, default="onnx")
    check.add_argument("--json", action="store_true", help="print JSON lines")
    check.add_argument(
        "--detectors",
        nargs="+",
        choices=("rap", "features", "reader", "switch"),
        help="what checks the texts (default: every detector the bundle has; reader, switch: a bundle calibrated "
        "with them, `calibrate rap --reader`, `--switch`)",
    )
    check.set_defaults(handler=_check)
    _add_serve(sub)
    return parser


def _add_serve(sub) -> None:
    from guard.settings import Settings

    serve = sub.add_parser(
        "serve",
        help="run the guard HTTP server",
        description=(
            "Serve a bundle over HTTP: /v1/check, /v1/classify, /v2/models/NAME/infer (Open Inference\n"
            "Protocol), /v1/feedback, /healthz, /readyz, /metrics; OpenAPI at /docs.\n"
            "Every option can also be set as an environment variable GUARD_<NAME> or in a YAML file\n"
            "(--config); flags win over the environment, which wins over the file.\n\n"
            "  guard serve --bundle bundle/ --port 8000\n"
            "  guard serve --bundle bundle/ --upstream http://127.0.0.1:9000 --upstream-text-pointer /inputs"
        ),
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            serve.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=field.description
            )
        elif field.annotation in (list[str], list[str] | None):
            default = f" (default: {' | '.join(field.default_factory())})" if field.default_factory else ""
            serve.add_argument(
                flag, nargs="*", default=argparse.SUPPRESS, metavar="ENTRY", help=f"{field.description}{default}"
            )
        else:
            default = "" if field.is_required() else f" (default: {field.default})"
            serve.add_argument(
                flag, default=argparse.SUPPRESS, metavar=name.upper(), help=f"{field.description}{default}"
            )
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from guard.server import serve
    from guard.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    serve(overrides, verbose=args.verbose)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from guard.core.bundle import load_bundle
    from guard.core.family import RAP_PLACES

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    print(
        f"bundle {bundle.path}: OK ({len(m.files)} files verified, schema {m.schema_version}, created {m.created_at})"
    )
    print(f"model: {m.model.source} labels={m.model.labels} max_length={m.model.max_length}")
    norms = f"norm {m.rap.init_norm:.3f} -> {m.rap.final_norm:.3f}; pass 2 puts it {RAP_PLACES[m.rap.position]}"
    print(f"RAP token id {m.rap.token_id} (init {m.rap.init_word!r}, {norms})")
    print(f"detectors: {', '.join(bundle.detectors)}")
    for p in m.protect:
        table = ", ".join(f"{float(k):.1%}: {v:+.4f}" for k, v in p.thresholds.items())
        print(
            f"protects label {p.label} ({p.name}); thresholds by FRR target: {table}; default FRR {m.default_frr:.1%}"
        )
    return 0


def _check(args: argparse.Namespace) -> int:
    from guard.core.backends import load_backend
    from guard.core.backends.base import precision_of
    from guard.core.bundle import load_bundle
    from guard.core.checker import Checker
    from guard.core.detection import DETECTORS, Detection
    from guard.core.errors import InputError

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise InputError("no texts given (pass them as arguments or one per line on stdin)")
    bundle = load_bundle(args.bundle)
    detectors = tuple(d for d in DETECTORS if d in args.detectors) if args.detectors else None
    backend = load_backend(args.backend, bundle.path)
    chosen = Detection.of(bundle, detectors, precision_of(backend.name))
    verdicts = Checker.for_bundle(bundle, backend, chosen, args.frr).check(texts)
    labels = bundle.manifest.model.labels
    for text, v in zip(texts, verdicts, strict=True):
        if args.json:
            print(
                json.dumps(
                    {
                        "text": text,
                        "label": v.label,
                        "label_name": labels[v.label],
                        "probs": v.probs,
                        "flagged": v.flagged,
                        "flagged_by": list(v.flagged_by),
                        "rap": v.rap.__dict__,
                        "feature_score": v.feature_score,
                        "feature_threshold": v.feature_threshold,
                    }
                )
            )
        else:
            rap = f"score {v.rap.score:+.4f} / threshold {v.rap.threshold:+.4f}" if v.rap.checked else "not checked"
            if v.feature_score is not None:
                rap += f"; feature score {v.feature_score:+.2f} / threshold {v.feature_threshold:+.2f}"
            decision = f"FLAGGED by {'+'.join(v.flagged_by)}" if v.flagged else "allowed"
            print(f"{decision}\t{labels[v.label]}\t{rap}\t{text}")
    return 3 if any(v.flagged for v in verdicts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
