"""``aligner-export models``: get SmolLM2-135M-Instruct and build its aligned sibling in the cache."""

from __future__ import annotations

from aligner_export.hf import zoo


def configure(parser) -> None:
    parser.add_argument("--adapter", default=None, help="safety LoRA adapter directory (default: the committed one)")
    parser.add_argument("--target-only", action="store_true", help="only get and convert the target model")


def run(args) -> int:
    print(f"target:  {zoo.ensure_target()}")
    if not args.target_only:
        print(f"aligned: {zoo.ensure_aligned(args.adapter)}")
    return 0
