"""The on-demand fuzzing campaign of the loaders of untrusted input (issue 14; not collected by pytest).

    nice .venv/bin/python tests/fuzz/campaign.py --mutations 10000 --seed 0

For each loader (the steering pack, the export manifest, the ONNX graph walker inside a whole export load, the prompt
and template files), runs ``--mutations`` mutations of valid seeds (``tests/fuzz/harness.py``) and counts the
outcomes: accepted, refused with a one-line AlignerError, or crashed (anything else). Prints a Markdown table for
docs/integrity.md and the first tracebacks of every crash; exits 1 when anything crashed. The same seed gives the same
mutations.
"""

from __future__ import annotations

import argparse
import collections
import random
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for "fuzz.harness"

from fuzz import harness  # noqa: E402

LOADERS = ("pack", "manifest", "graph", "prompts", "inspect-manifest", "inspect-pack", "inspect-export", "requests",
           "signature")
EXPORT_KINDS = (("function", 1), ("inline", 1), ("function", 2))


def _pack(rng: random.Random, root: Path):
    seeds = [harness.seed_pack(root / f"seed-{linear}.safetensors", linear=linear).read_bytes()
             for linear in (True, False)]
    target = root / "mutated.safetensors"
    return lambda: harness.pack_target(target, harness.mutate_pack(rng, rng.choice(seeds)))


def _exports(root: Path):
    exports = {kind: harness.seed_export(root / f"export-{kind[0]}-{kind[1]}", *kind) for kind in EXPORT_KINDS}
    return exports, {kind: ((path / "inferaligner.json").read_text(), (path / "model.onnx").read_bytes())
                     for kind, path in exports.items()}


def _manifest(rng: random.Random, root: Path):
    exports, seeds = _exports(root)

    def one():
        kind = rng.choice(EXPORT_KINDS)
        try:
            return harness.manifest_target(exports[kind], harness.mutate_manifest(rng, seeds[kind][0]),
                                           verify_weights=rng.random() < 0.5, allow_legacy=rng.random() < 0.3,
                                           allow_unsteered=rng.random() < 0.3)
        finally:
            (exports[kind] / "inferaligner.json").write_text(seeds[kind][0])
    return one


def _graph(rng: random.Random, root: Path):
    exports, seeds = _exports(root)

    def one():
        kind = rng.choice(EXPORT_KINDS)
        try:
            return harness.graph_target(exports[kind], harness.mutate_bytes(rng, seeds[kind][1]),
                                        allow_unsteered=rng.random() < 0.3)
        finally:
            (exports[kind] / "model.onnx").write_bytes(seeds[kind][1])
    return one


def _prompts(rng: random.Random, root: Path):
    def one():
        suffix = rng.choice(harness.PROMPT_SUFFIXES)
        return harness.prompt_target(root, suffix, harness.mutate_prompt_file(rng, suffix))
    return one


def _inspect_manifest(rng: random.Random, root: Path):
    exports, seeds = _exports(root)

    def one():
        kind = rng.choice(EXPORT_KINDS)
        try:
            return harness.inspect_manifest_target(exports[kind], harness.mutate_manifest(rng, seeds[kind][0]))
        finally:
            (exports[kind] / "inferaligner.json").write_text(seeds[kind][0])
    return one


def _inspect_pack(rng: random.Random, root: Path):
    seeds = [harness.seed_pack(root / f"seed-{linear}.safetensors", linear=linear).read_bytes()
             for linear in (True, False)]
    target = root / "mutated.safetensors"
    return lambda: harness.inspect_pack_target(target, harness.mutate_pack(rng, rng.choice(seeds)))


def _inspect_export(rng: random.Random, root: Path):
    """Export directories: the graph's bytes, or a whole-file swap (tokenizer, template, signature) mutated."""
    exports, seeds = _exports(root)
    others = {kind: {name: (path / name).read_bytes() for name in ("tokenizer_config.json", "chat_template.jinja")}
              for kind, path in exports.items()}

    def one():
        kind = rng.choice(EXPORT_KINDS)
        path = exports[kind]
        try:
            if rng.random() < 0.7:
                return harness.inspect_graph_target(path, harness.mutate_bytes(rng, seeds[kind][1]))
            name = rng.choice(sorted(others[kind]))
            (path / name).write_bytes(harness.mutate_bytes(rng, others[kind][name]))
            return harness.inspect_target(path)
        finally:
            (path / "model.onnx").write_bytes(seeds[kind][1])
            for name, data in others[kind].items():
                (path / name).write_bytes(data)
    return one


def _requests(rng: random.Random, root: Path):
    return lambda: harness.request_target(harness.mutate_request(rng))


def _signature(rng: random.Random, root: Path):
    path = harness.seed_export(root / "export-signed")
    seed, public = harness.seed_signature(path, root)
    key_seed = public.read_bytes()

    def one():
        key_data = harness.mutate_bytes(rng, key_seed) if rng.random() < 0.2 else None
        return harness.signature_target(path, harness.mutate_signature(rng, seed), public, key_data)
    return one


TARGETS = {"pack": _pack, "manifest": _manifest, "graph": _graph, "prompts": _prompts,
           "inspect-manifest": _inspect_manifest, "inspect-pack": _inspect_pack, "inspect-export": _inspect_export,
           "requests": _requests, "signature": _signature}


def run(loader: str, mutations: int, seed: int, keep: int = 3) -> dict:
    rng = random.Random(f"{loader}:{seed}")
    counts: collections.Counter = collections.Counter()
    crashes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{loader}-") as tmp:
        one = TARGETS[loader](rng, Path(tmp))
        start = time.perf_counter()
        for _ in range(mutations):
            try:
                counts[one()] += 1
            except harness.Crash as crash:
                counts["crashed"] += 1
                text = str(crash)
                crashes.setdefault(text.splitlines()[0][:160], text)
        seconds = time.perf_counter() - start
    return {"loader": loader, "mutations": mutations, "accepted": counts["accepted"], "refused": counts["refused"],
            "crashed": counts["crashed"], "seconds": seconds, "crashes": dict(list(crashes.items())[:keep])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=10_000, help="mutations per loader (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", choices=LOADERS, help="run only these loaders (repeatable)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # legacy-format loads warn by design; the outcome is what is counted
    rows = []
    for loader in args.only or LOADERS:
        row = run(loader, args.mutations, args.seed)
        rows.append(row)
        print(f"{loader}: {row['mutations']} mutations, {row['accepted']} accepted, {row['refused']} refused, "
              f"{row['crashed']} crashed, {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("| loader | mutations | accepted | refused | crashes | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['loader']} | {row['mutations']} | {row['accepted']} | {row['refused']} | {row['crashed']} | "
              f"{row['seconds']:.0f} |")
    print(f"\npeak resident memory of the campaign process: {peak:.0f} MiB; seed {args.seed}; "
          f"Python {sys.version.split()[0]}")
    for row in rows:
        for first, text in row["crashes"].items():
            print(f"\n### crash in {row['loader']}: {first}\n{text}".encode("utf-8", "backslashreplace").decode())
    return 1 if any(row["crashed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
