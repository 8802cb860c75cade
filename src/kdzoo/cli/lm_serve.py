"""``kdzoo lm serve RUN_DIR``: a model on the OpenAI completions API, the teacher for ``teacher: {endpoint: ...}``."""
from __future__ import annotations

import argparse
import sys

from ..engine.runtime import resolve_device
from ..errors import ConfigError, KdzooError
from ..tasks.lm.models import require_transformers
from ..tasks.lm.server import load_engine, make_server

SERVE_DESCRIPTION = (
    "Serve a kdzoo lm run directory or a transformers directory on the OpenAI legacy completions API "
    "(POST /v1/completions, GET /v1/models, GET /health), the way vLLM and SGLang do, so that a student can be "
    "distilled from its top-k log-probabilities with 'teacher: {endpoint: URL, model: NAME, top_k: K}'. "
    "Supported: prompt as a string, a list of token ids or a list of those; max_tokens (0 with echo scores the "
    "prompt only); echo; logprobs (top-k, at most --max-top-k); temperature (0 greedy, otherwise sampled; "
    "seed makes it repeatable); and vLLM's return_tokens_as_token_ids. Log-probabilities are the model's own "
    "(temperature 1). Standard library only; one request at a time on the model.")

SERVE_EPILOG = ("Example: kdzoo lm serve runs/lm/teacher --port 8000, then curl -s localhost:8000/v1/completions "
                "-H 'Content-Type: application/json' -d '{\"model\": \"teacher\", \"prompt\": [1, 2, 3], "
                "\"max_tokens\": 1, \"echo\": true, \"logprobs\": 5, \"temperature\": 0}'. Stop with Ctrl-C.")


def add_serve_parser(lm_subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to the subparsers of ``kdzoo lm``."""
    p = lm_subparsers.add_parser("serve", help="serve a model on the OpenAI completions API (a remote teacher)",
                                 description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG)
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="kdzoo lm run directory or transformers directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--max-top-k", type=int, default=20,
                   help="largest 'logprobs' a request may ask for (default 20); larger requests get HTTP 400")
    p.add_argument("--model-name", default=None,
                   help="the name clients pass as 'model' (default: the directory's name)")
    p.add_argument("--log-requests", action="store_true", help="print one line per request to stderr")
    p.set_defaults(func=cmd_lm_serve)


def cmd_lm_serve(args) -> int:
    require_transformers()
    if args.max_top_k < 0:
        raise ConfigError(f"--max-top-k must be >= 0, got {args.max_top_k}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must lie in 0..65535, got {args.port}")
    engine = load_engine(args.run_dir, args.model_name, args.max_top_k, resolve_device(args.device))
    server = make_server(engine, args.host, args.port, args.log_requests)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"kdzoo lm serve: model {engine.name!r} on http://{shown}:{port}/v1 "
          f"(POST /v1/completions, GET /v1/models; top-k up to {engine.max_top_k}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("kdzoo lm serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m kdzoo.cli.lm_serve RUN_DIR ...``: the same command outside the ``kdzoo`` parser."""
    parser = argparse.ArgumentParser(prog="kdzoo lm serve", description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_lm_serve(args)
    except (KdzooError, OSError) as err:
        print(f"kdzoo lm serve: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
