"""Measures what docs/layout.md reports: contract literals spelled outside ``aligner_runtime/contract/``,
function-level imports and import circles. ``python tests/contract_counts.py`` from the repository root (not a pytest
module; ``tests/test_layout.py`` checks the layout rules with its import reader and graph).

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
    for top in TOPS:
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


TOPS = ("export/aligner_export", "runtime/aligner_runtime")


class Import:
    """One import statement: where it is, the absolute module names it names, whether it runs only when a function
    is called, and the ``# deferred: <reason>`` comment directly above it or above its block of imports."""

    def __init__(self, node, targets: list[str], in_function: bool, comment: str | None):
        self.line, self.targets, self.in_function, self.comment = node.lineno, targets, in_function, comment
        # what the statement imports: ``from a import b`` imports ``a.b`` (module a.b, or name b of module a)
        self.imported = targets[1:] if isinstance(node, ast.ImportFrom) else targets


def _targets(node, package: str) -> list[str]:
    """The absolute names an import statement names (``from . import x`` resolved against ``package``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in (getattr(node.test, "id", None), getattr(node.test, "attr", None))


def imports(path: Path, package: str) -> list[Import]:
    """Every import statement of ``path`` but those under ``if TYPE_CHECKING:`` (never executed). An import inside a
    function body is function-level; one in a class body or a module-level ``if``/``try`` runs at import."""
    lines = path.read_text().splitlines()
    found: list[Import] = []

    def comment_above(stmt) -> str | None:
        text = lines[stmt.lineno - 2].strip() if stmt.lineno >= 2 else ""
        return text if text.startswith("# deferred:") else None

    def walk_body(body, in_function: bool):
        block_comment = None  # a comment above the first import of a run of consecutive imports covers the run
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                comment = comment_above(stmt) or block_comment
                block_comment = comment
                found.append(Import(stmt, _targets(stmt, package), in_function, comment))
                continue
            block_comment = None
            if isinstance(stmt, ast.If) and _is_type_checking(stmt):
                continue
            inner = in_function or isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))
            for field in ("body", "orelse", "finalbody"):
                if isinstance(getattr(stmt, field, None), list):
                    walk_body(getattr(stmt, field), inner)
            for handler in getattr(stmt, "handlers", []):
                walk_body(handler.body, inner)
            for case in getattr(stmt, "cases", []):
                walk_body(case.body, inner)

    walk_body(ast.parse(path.read_text()).body, False)
    return found


def function_imports(path: Path) -> int:
    """The number of function-level import statements in ``path``."""
    return sum(i.in_function for i in imports(path, ""))


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("").parts[1:]  # drop export/ or runtime/
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def package_modules(root: Path = ROOT, tops=TOPS) -> dict[str, Path]:
    return {module_name(p, root): p for top in tops for p in sorted((root / top).rglob("*.py"))}


def resolve(target: str, modules) -> str:
    """The package module ``target`` names (``pkg.mod.attr`` -> ``pkg.mod``), or "" for none."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target


def import_graph(root: Path = ROOT, tops=TOPS, function_level: bool = True,
                 external: dict | None = None) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level and (``function_level``) inside functions. With
    ``external`` (a dict), also records there each module's top-level names of other packages it imports."""
    modules = package_modules(root, tops)
    tops_of = {Path(top).name for top in tops}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges, others = set(), set()
        for record in imports(path, package):
            if record.in_function and not function_level:
                continue
            top = record.targets[0].partition(".")[0]
            if top not in tops_of:
                others.add(top)
                continue
            for target in record.targets:
                target = resolve(target, modules)
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
        if external is not None:
            external[name] = others
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
