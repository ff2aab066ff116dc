"""``aligner-serve``: an OpenAI-compatible HTTP endpoint for one appliance, steering always on (issue 13).

    aligner-serve --model OUTDIR [--host 127.0.0.1] [--port 8000] [--max-batch-size 16] [--max-queue 64]

Serves ``/v1/chat/completions``, ``/v1/completions`` (streaming over SSE), ``/v1/models``, ``/health`` and
``/metrics``; see docs/serving.md. There is deliberately no option to turn the gate off.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from pathlib import Path

from ..api import Aligner
from ..contract.choices import BACKENDS, PREFILL_MODES, PROVIDERS
from ..errors import AlignerError, argument_parser, check_count, run_cli
from ..sampling import MAX_NEW_TOKENS
from ..signing import add_trust_options
from .http import Server, _imports, create_app
from .scheduler import Scheduler

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")  # uvicorn's


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser(prog="aligner-serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="export directory (or engine file / dir with --backend tensorrt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model name clients give (default: the export directory's name)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    p.add_argument("--provider", action="append", choices=PROVIDERS,
                   help="ONNX Runtime execution provider, in order of preference (repeatable; default cpu)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    p.add_argument("--plugins", help="steering plugin library for --backend tensorrt")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a row; past it, 503 with Retry-After (default 64)")
    p.add_argument("--prefill", default="alone", choices=PREFILL_MODES,
                   help="prefill each joining request alone (default; the same call as a run alone) or the joiners "
                        "of one step together")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="new tokens when a request gives no max_tokens (at most 32768 and the context length)")
    add_trust_options(p)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request ends (504)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def _listen(host: str, port: int):
    """The listening socket, opened here so that a port in use is one error line, before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AlignerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def _quiet_sigterm() -> None:
    """uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the previous handler: a
    finished graceful shutdown is a clean exit (status 0), not ``run_cli``'s 143 for an interrupted command."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda _signum, _frame: None)


def run(args) -> int:
    check_count(args.port, "--port", 0, 65535)
    check_count(args.max_batch_size, "--max-batch-size", 1, 4096)
    check_count(args.max_queue, "--max-queue", 0, 1 << 20)
    check_count(args.max_tokens, "--max-tokens", 1, MAX_NEW_TOKENS)
    if not args.request_timeout > 0:
        raise AlignerError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    _imports()
    # deferred: uvicorn comes with the 'serve' extra; _imports() has just said so if it is missing
    import uvicorn

    sock = _listen(args.host, args.port)
    try:
        aligner = Aligner.load(args.model, backend=args.backend, providers=args.provider, threads=args.threads,
                               plugins=args.plugins, trusted_keys=args.trusted_key, expect_sha256=args.expect_sha256)
        if aligner.context_length and args.max_tokens > aligner.context_length:
            raise AlignerError(f"--max-tokens {args.max_tokens} is over the export's context length "
                               f"{aligner.context_length}")
        scheduler = Scheduler.for_aligner(aligner, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                                          prefill=args.prefill)
    except BaseException:
        sock.close()
        raise
    try:
        name = args.served_model_name or Path(args.model).resolve().name
        server = Server(aligner, scheduler, model_name=name, default_max_tokens=args.max_tokens,
                        request_timeout=args.request_timeout)
        config = uvicorn.Config(create_app(server), log_level=args.log_level, timeout_graceful_shutdown=10)
        host, port = sock.getsockname()[:2]
        print(f"aligner-serve: {name} on http://{host}:{port} (steering on, gate at layer "
              f"{aligner.export.gate_layer}, max batch {args.max_batch_size})", file=sys.stderr, flush=True)
        _quiet_sigterm()
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        scheduler.close()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
