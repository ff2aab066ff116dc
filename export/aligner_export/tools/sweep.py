"""Steering-strength sweep on the PyTorch reference: how often the steered target refuses, per (alpha, layers).

    python -m aligner_export.tools.sweep --target DIR --pack PACK --prompts FILE [--alphas 0.5,1,2] [--blocks 12-29,16-25]

Every prompt runs with the gate forced open (``gate_in = 1``), so the figure measures the shift alone, not the gate.
Use prompts that calibration held out (the pack's validation indices) or another set that evaluation never sees.
Alphas are given as multiples of the pack's recommended alpha.
"""

from __future__ import annotations

import argparse
import json
import sys

from aligner_runtime.errors import run_cli


def parse_block(text: str) -> list[int]:
    start, _, end = text.partition("-")
    return list(range(int(start), int(end or start) + 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aligner_export.tools.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--pack", required=True)
    parser.add_argument("--prompts", required=True, help="harmful prompts held out from calibration")
    parser.add_argument("--alphas", default="0.5,1,2", help="multiples of the recommended alpha")
    parser.add_argument("--blocks", default="", help="comma-separated A-B blocks (default: the recommended one)")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)

    def job() -> int:
        import numpy as np
        import torch

        from aligner_runtime.prompts import load_prompts

        from aligner_export.evaluation.judge import KeywordJudge
        from aligner_export.hf.modeling import chat_texts, load_model, tokenize_batch
        from aligner_export.pack import load_pack
        from aligner_export.hf.reference import steered

        pack = load_pack(args.pack)
        rec = pack.recommended
        model, tok = load_model(args.target)
        prompts = load_prompts(args.prompts)[: args.limit]
        texts, _, _ = chat_texts(tok, prompts)
        batch = tokenize_batch(tok, texts, "left")
        judge = KeywordJudge()
        blocks = [parse_block(b) for b in args.blocks.split(",") if b] or [rec["steer_layers"]]
        rows = []
        for block in blocks:
            for mult in [float(a) for a in args.alphas.split(",")]:
                alpha = rec["alpha"] * mult
                spec = pack.steer_config(block, alpha, pack.paper_gate(rec["gate_layer"], rec["bias_rule"]))
                with steered(model, spec) as state, torch.no_grad():
                    state.gate_in = torch.ones(len(prompts))
                    out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
                answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                refusal = float(np.mean([judge.is_refusal(p, a) for p, a in zip(prompts, answers)]))
                rows.append({"block": f"{block[0]}-{block[-1]}", "alpha": round(alpha, 3), "refusal": refusal,
                             "example": answers[0][:120]})
                print(f"layers {block[0]:>2}-{block[-1]:<2} alpha {alpha:8.3f}  refusal {refusal:5.1%}  "
                      f"e.g. {answers[0][:90]!r}", flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=2)
        return 0

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
