"""``aligner-run``: generate with an export dir or a TensorRT engine, steering always on (docs/architecture.md §7).

    aligner-run --model OUTDIR --prompt "How do I bake bread?"
    aligner-run --model OUTDIR --prompt-file prompts.txt --json        # one JSON object per prompt
    aligner-run --model OUTDIR --chat                                  # interactive; one user turn per line
    aligner-run --model VLM_OUTDIR --image cat.png --prompt "What is this?"   # a vision-language export

The answer streams to a terminal; the gate line goes to stderr. There is deliberately no option to turn the gate
off: comparisons with steering disabled belong to ``aligner-export eval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .api import Aligner
from .contract.choices import BACKENDS, PROVIDERS
from .errors import AlignerError, argument_parser, run_cli
from .prompts import PromptItem, load_prompt_items
from .sampling import MAX_NEW_TOKENS
from .signing import add_trust_options
from .vision import load_image


def build_parser() -> argparse.ArgumentParser:
    p = argument_parser(prog="aligner-run", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="export directory, or engine file / dir (--backend tensorrt)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompt-file", help="prompts: .txt (one per line), .json, .jsonl or .csv")
    src.add_argument("--chat", action="store_true", help="interactive loop: each line is a new single-turn prompt")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="image for --prompt (vision-language exports; repeatable for several images). With "
                        "--prompt-file, images come from the file's image fields (JSON/JSONL)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    p.add_argument("--provider", action="append", choices=PROVIDERS,
                   help="ONNX Runtime execution provider, in order of preference (repeatable; default cpu)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    p.add_argument("--plugins", help="steering plugin library for --backend tensorrt (default: the engine stamp's)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="new tokens per answer (at most 32768 and the export's context length; default 128)")
    add_trust_options(p)
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
    line = (f"[gate={int(result.gate)} score={result.score:+.4f} new_tokens={result.new_tokens} "
            f"seconds={result.seconds:.2f}]")
    return line + (f"\nwarning: {result.warning}" if result.warning else "")


def _stream_one(aligner, prompt: str, options: dict, images=None) -> None:
    stream = aligner.stream(prompt, system=options.get("system"), images=images, **options["sampling"])
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(_gate_line(stream.result), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def run(args) -> int:
    if args.prompt is None and args.prompt_file is None and not args.chat:
        raise AlignerError("give --prompt, --prompt-file or --chat")
    if args.prompt is not None and not args.prompt.strip():
        raise AlignerError("empty prompt")
    if args.image and args.prompt is None:
        raise AlignerError("--image goes with --prompt; a --prompt-file names its images in its image fields")
    images = tuple(Path(i) for i in args.image or ())
    items = [PromptItem(args.prompt, images)] if args.prompt is not None else (
        load_prompt_items(args.prompt_file) if args.prompt_file else [])
    prompts = [item.text for item in items]
    prompt_images = [list(item.images) or None for item in items]
    if args.chat and args.json:
        raise AlignerError("--chat and --json cannot be combined")

    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:  # before the model is loaded
        raise AlignerError(f"--max-new-tokens must be in [1, {MAX_NEW_TOKENS}], got {args.max_new_tokens}")
    aligner = Aligner.load(args.model, backend=args.backend, providers=args.provider, threads=args.threads,
                           plugins=args.plugins, trusted_keys=args.trusted_key, expect_sha256=args.expect_sha256)
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_token_ids=args.stop_token_id)
    aligner.sampling_config(**sampling)  # invalid sampling options fail before any output
    options = {"system": args.system, "sampling": sampling}
    if any(prompt_images):
        if not aligner.multimodal:
            raise AlignerError(f"{args.model} is a text-only export (no vision graph): it cannot take an image")
        for sources in prompt_images:  # every image is read before anything is generated or printed
            for source in sources or ():
                load_image(source)

    if args.chat:
        return _chat(aligner, options)
    stream = not args.json and not args.no_stream and sys.stdout.isatty() and len(prompts) == 1
    if stream:
        _stream_one(aligner, prompts[0], options, prompt_images[0])
        return 0
    # Everything is validated and generated before anything is printed: no partial output on a user error.
    results = aligner.generate(prompts, system=args.system, batch_size=args.batch_size,
                               images=prompt_images if any(prompt_images) else None, **sampling)
    for i, result in enumerate(results):
        if args.json:
            print(json.dumps(result.to_json(), ensure_ascii=False, allow_nan=False))
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
        except UnicodeDecodeError:
            raise AlignerError("standard input is not UTF-8 text") from None
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
