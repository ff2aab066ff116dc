"""Measures what docs/layout.md reports: contract literals spelled outside ``aligner_runtime/contract/``,
function-level imports and import circles. ``python tests/contract_counts.py`` from the repository root (not a pytest module).

A literal is a whole Python string token (implicit concatenations included), so words inside messages do not count.
Manifest keys are counted twice: the keys no other format shares (``steer_layers``, ``format_version``, ...) and every
key of ``contract.Key`` (generic words such as ``alpha``, ``gate`` or ``io`` also name pack fields and locals). Some
distinctive manifest words are also steering-pack fields (``gate_layer``, ``steer_layers``, ``bias_rule`` in the pack's
``recommended``); since issue 19 those have their own constants (``contract.pack``), so a literal of either format
outside the contract package counts here. The pack's own distinctive keys (``per_layer``, ``recommended``, the
per-layer statistics) are counted on a line of their own."""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

from aligner_runtime.contract import Key  # noqa: E402
from aligner_runtime.contract import pack as pack_keys  # noqa: E402

BASE_IO = {"input_ids", "attention_mask", "position_ids", "logits", "inputs_embeds"}
# Words that are manifest keys and also name other things. "format_version" (generic since issue 19) is the version key
# of every file the package writes (the manifest, the pack, the engine stamp, the evaluation report, the corpus
# MANIFEST.json): its remaining literals were those other formats' own keys.
GENERIC = {"alpha", "bias", "gate", "io", "dtype", "site", "opset", "weights", "validation", "integrity", "strength",
           "multimodal", "exporter", "num_layers", "hidden_size", "format_version"}
KEYS = {v for k, v in vars(Key).items() if not k.startswith("_")}
# The pack's keys that no manifest key spells (words such as "mode", "site" or "layer" are left out as generic).
PACK_KEYS = {v for cls in (pack_keys.PackKey, pack_keys.RecommendedKey, pack_keys.ModelInfoKey, pack_keys.LayerStatsKey)
             for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, str)} - KEYS \
    - {"mode", "site", "token", "target", "aligned", "prompts", "seed", "layer", "ssv", "margin", "source",
       "fingerprint"}


def sources():
    for top in ("export/aligner_export", "runtime/aligner_runtime"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "/contract/" not in path.as_posix():
                yield path


def string_values(path: Path):
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.STRING and tok.string[:1] in "\"'":
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, str):
                yield value


def function_imports(path: Path) -> int:
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    return sum(isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top for n in ast.walk(tree))


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts[1:]  # drop export/ or runtime/
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module or function level (``from . import x`` resolved)."""
    paths = [p for top in ("export/aligner_export", "runtime/aligner_runtime") for p in (ROOT / top).rglob("*.py")]
    modules = {module_name(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v); on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> None:
    io_sites, key_sites, distinct_sites, pack_sites, imports = Counter(), Counter(), Counter(), Counter(), Counter()
    for path in sources():
        rel = path.relative_to(ROOT).as_posix()
        for value in string_values(path):
            if value in BASE_IO or value.startswith(("past_key_values.", "present.")):
                io_sites[rel] += 1
            if value in KEYS:
                key_sites[rel] += 1
                if value not in GENERIC:
                    distinct_sites[rel] += 1
            if value in PACK_KEYS:
                pack_sites[rel] += 1
        imports[rel.split("/")[0]] += function_imports(path)
    print(f"base-I/O literals outside the contract package: {sum(io_sites.values())} in {len(io_sites)} files")
    for rel, n in io_sites.most_common():
        print(f"  {n:3d} {rel}")
    print(f"manifest-key literals (distinctive keys): {sum(distinct_sites.values())} in {len(distinct_sites)} files")
    for rel, n in distinct_sites.most_common():
        print(f"  {n:3d} {rel}")
    print(f"manifest-key literals (every key, generic words included): {sum(key_sites.values())} in "
          f"{len(key_sites)} files")
    print(f"pack-key literals (keys no manifest key spells: {', '.join(sorted(PACK_KEYS))}): "
          f"{sum(pack_sites.values())} in {len(pack_sites)} files")
    for rel, n in pack_sites.most_common():
        print(f"  {n:3d} {rel}")
    print(f"function-level imports: export {imports['export']}, runtime {imports['runtime']}")
    found = cycles(import_graph())
    print(f"import circles (module or function level): {len(found)}")
    for comp in found:
        print("  " + " <-> ".join(comp))


if __name__ == "__main__":
    main()
