"""``aligner-run``: generate with an export dir or a TensorRT engine, steering always on (ARCHITECTURE.md §7).

    aligner-run --model OUTDIR --prompt "How do I bake bread?"
    aligner-run --model OUTDIR --prompt-file prompts.txt --json        # one JSON object per prompt
    aligner-run --model OUTDIR --chat                                  # interactive; one user turn per line

The answer streams to a terminal; the gate line goes to stderr. There is deliberately no option to turn the gate
off: comparisons with steering disabled belong to ``aligner-export eval``.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import AlignerError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aligner-run", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="export directory, or engine file / dir (--backend tensorrt)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompt-file", help="prompts: .txt (one per line), .json, .jsonl or .csv")
    src.add_argument("--chat", action="store_true", help="interactive loop: each line is a new single-turn prompt")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    p.add_argument("--provider", action="append", choices=("cpu", "cuda", "tensorrt"),
                   help="ONNX Runtime execution provider, in order of preference (repeatable; default cpu)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    p.add_argument("--plugins", help="steering plugin library for --backend tensorrt (default: the engine stamp's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for --do-sample (same seed, same answer)")
    p.add_argument("--stop-token-id", type=int, action="append", default=None,
                   help="extra stop token id (repeatable); the model's EOS ids always stop")
    p.add_argument("--system", help="system message put before each prompt")
    p.add_argument("--batch-size", type=int, default=1, help="prompts run together from --prompt-file")
    p.add_argument("--json", action="store_true",
                   help='print one object per prompt: {"text", "gate", "score", "new_tokens", "seconds"}')
    p.add_argument("--no-stream", action="store_true", help="print each answer only when it is complete")
    return p


def _gate_line(result) -> str:
    if result.gate is None:
        return f"[unsteered model] new_tokens={result.new_tokens} seconds={result.seconds:.2f}"
    return (f"[gate={int(result.gate)} score={result.score:+.4f} new_tokens={result.new_tokens} "
            f"seconds={result.seconds:.2f}]")


def _stream_one(aligner, prompt: str, options: dict) -> None:
    stream = aligner.stream(prompt, system=options.get("system"), **options["sampling"])
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(_gate_line(stream.result), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def run(args) -> int:
    from .prompts import load_prompts

    if args.prompt is None and args.prompt_file is None and not args.chat:
        raise AlignerError("give --prompt, --prompt-file or --chat")
    if args.prompt is not None and not args.prompt.strip():
        raise AlignerError("empty prompt")
    prompts = [args.prompt] if args.prompt is not None else (load_prompts(args.prompt_file)
                                                             if args.prompt_file else [])
    if args.chat and args.json:
        raise AlignerError("--chat and --json cannot be combined")

    from .api import Aligner

    aligner = Aligner.load(args.model, backend=args.backend, providers=args.provider, threads=args.threads,
                           plugins=args.plugins)
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_token_ids=args.stop_token_id)
    aligner._config(**sampling)  # invalid sampling options fail before any output
    options = {"system": args.system, "sampling": sampling}

    if args.chat:
        return _chat(aligner, options)
    stream = not args.json and not args.no_stream and sys.stdout.isatty() and len(prompts) == 1
    if stream:
        _stream_one(aligner, prompts[0], options)
        return 0
    # Everything is validated and generated before anything is printed: no partial output on a user error.
    results = aligner.generate(prompts, system=args.system, batch_size=args.batch_size, **sampling)
    for i, result in enumerate(results):
        if args.json:
            print(json.dumps(result.to_json(), ensure_ascii=False))
        else:
            if len(results) > 1:
                print(f"### {i + 1}: {prompts[i]}")
            print(result.text)
            print(_gate_line(result), file=sys.stderr)
    return 0


def _chat(aligner, options: dict) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        print("aligner-run chat: one prompt per line; each line is a new conversation (the gate reads one user "
              "turn). Ctrl-D or /quit ends.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if not line.strip():
            continue
        try:
            _stream_one(aligner, line, options)
        except AlignerError as exc:  # a bad line ends that turn, not the session
            print(f"error: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
