"""Builds the contestants of ``bench_edge.py`` once and writes its ``bench.json`` (issue 11).

    .venv/bin/python tests/benchmarks/prepare_edge.py --work DIR [--target MODEL_DIR] [--pack PACK]
                                                     [--genai-python PY] [--skip-optimum] [--skip-llamacpp]

Into ``--work``:

- ``genai/int4``, ``genai/fp32``: the onnxruntime-genai builder's models of the target (unsteered; its own venv);
- ``steered-int4``, ``steered-fp32``: ``aligner-export export --exporter genai [--weights int4]`` (the builder's
  fused graph, steered; int4 quantized after the rewrite and validated against the steered fp32 graph);
  ``steered-int4-hqq`` (``--quant-method hqq``: HQQ's float zero points kept exactly, correction nodes) and
  ``steered-int4-hqq-kernel`` (``--zero-points kernel``: folded into the kernel's integer zero points);
- ``steered-optimum-fp32``, ``steered-optimum-int4``: the default optimum export, and its int4 form (what an export
  was before issue 11: the comparison "0.63x" of the issue is this graph);
- ``smollm2-q4_0.gguf`` (+ ``-f32``): llama.cpp's conversion, when llama-cpp-python imports in the genai venv and
  its sdist's ``convert_hf_to_gguf.py`` can be had (``pip download --no-binary``).

Each step is skipped when its output exists. The pack defaults to ``$INFERALIGNER_HOME/demo/smollm2.steering.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOME = Path(os.environ.get("INFERALIGNER_HOME", Path.home() / ".cache" / "inferaligner-edge"))


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def export(target: Path, pack: Path, out: Path, *extra: str) -> None:
    if (out / "inferaligner.json").is_file():
        return
    run([sys.executable, "-m", "aligner_export", "export", "--target", target, "--pack", pack, "-o", out, *extra])


def genai_build(python: Path, target: Path, out: Path, precision: str) -> None:
    if (out / "genai_config.json").is_file():
        return
    run([python, "-m", "onnxruntime_genai.models.builder", "-m", target, "-o", out, "-p", precision, "-e", "cpu",
         "-c", out.parent / ".cache"], env={**os.environ, "HF_HUB_OFFLINE": "1"})


def concrete_graph(builder_dir: Path, head_dim: int) -> Path:
    """The builder's graph with the KV head dimension written as a number (the runtime needs it to size the cache),
    beside the original so that it reads the same external data file; nothing else changes."""
    # deferred: onnx only once a builder graph exists to rewrite
    import onnx

    out = builder_dir / "model.concrete.onnx"
    if out.is_file():
        return out
    model = onnx.load(str(builder_dir / "model.onnx"), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if (value.name.startswith("past_key_values.") or value.name.startswith("present.")) and len(dims) == 4:
            dims[3].Clear()
            dims[3].dim_value = head_dim
    onnx.save(model, str(out))
    return out


def gguf(python: Path, target: Path, work: Path) -> dict[str, Path]:
    """llama.cpp's GGUF files of the target (f32 and Q4_0), or {} with the reason printed."""
    have = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                          text=True)
    if have.returncode != 0:
        print(f"llama.cpp skipped: llama-cpp-python does not import in {python}")
        return {}
    out = {"f32": work / "smollm2-f32.gguf", "q4_0": work / "smollm2-q4_0.gguf"}
    if not out["f32"].is_file():
        src = work / "llama-cpp-src"
        if not src.is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                run([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                     f"llama-cpp-python=={have.stdout.strip()}"])
                archive = next(Path(tmp).glob("*.tar.gz"))
                with tarfile.open(archive) as tar:
                    tar.extractall(src, filter="data")
        root = next(src.glob("*/vendor/llama.cpp"))
        env = {**os.environ, "PYTHONPATH": str(root / "gguf-py"), "NO_LOCAL_GGUF": ""}
        run([python, root / "convert_hf_to_gguf.py", target, "--outtype", "f32", "--outfile", out["f32"]], env=env)
    if not out["q4_0"].is_file():
        code = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
                "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0; p.nthread = 2; "
                "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
        run([python, "-c", code, out["f32"], out["q4_0"]])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--target", default=str(HOME / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--pack", default=str(HOME / "demo" / "smollm2.steering.safetensors"))
    parser.add_argument("--genai-python", default=str(HOME / "venv-genai" / "bin" / "python"))
    parser.add_argument("--skip-optimum", action="store_true")
    parser.add_argument("--skip-llamacpp", action="store_true")
    args = parser.parse_args()
    work, target, pack = Path(args.work), Path(args.target), Path(args.pack)
    python = Path(args.genai_python)
    work.mkdir(parents=True, exist_ok=True)
    for precision in ("int4", "fp32"):
        genai_build(python, target, work / "genai" / precision, precision)
    config = json.loads((target / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    plain = {p: concrete_graph(work / "genai" / p, head_dim) for p in ("int4", "fp32")}
    genai = ("--exporter", "genai", "--genai-python", str(python))
    export(target, pack, work / "steered-fp32", *genai)
    # the default int4 (gate path at 8 bits) must pass the export's own gate check; the HQQ forms are measured
    # whatever their gates do (their agreement is printed beside their speed)
    export(target, pack, work / "steered-int4", *genai, "--weights", "int4")
    export(target, pack, work / "steered-int4-hqq", *genai, "--weights", "int4", "--quant-method", "hqq",
           "--min-gate-agreement", "0")
    export(target, pack, work / "steered-int4-hqq-kernel", *genai, "--weights", "int4", "--quant-method", "hqq",
           "--zero-points", "kernel", "--min-gate-agreement", "0")
    contestants = [
        {"name": "ours-int4", "kind": "ours", "model": str(work / "steered-int4"), "gate": 1},
        {"name": "ours-int4-hqq", "kind": "ours", "model": str(work / "steered-int4-hqq"), "gate": 1},
        {"name": "ours-int4-hqq-kernel", "kind": "ours", "model": str(work / "steered-int4-hqq-kernel"), "gate": 1},
        {"name": "ours-int4-off", "kind": "ours-plain", "model": str(plain["int4"])},
        {"name": "genai-int4", "kind": "genai", "model": str(work / "genai" / "int4"), "python": str(python)},
        {"name": "ours-fp32", "kind": "ours", "model": str(work / "steered-fp32"), "gate": 1},
        {"name": "ours-fp32-off", "kind": "ours-plain", "model": str(plain["fp32"])},
        {"name": "genai-fp32", "kind": "genai", "model": str(work / "genai" / "fp32"), "python": str(python)},
    ]
    ratios = [["ours-int4", "genai-int4"], ["ours-fp32", "genai-fp32"], ["ours-int4", "ours-fp32"],
              ["ours-int4-hqq", "genai-int4"], ["ours-int4-hqq-kernel", "ours-int4-hqq"],
              ["ours-int4", "ours-int4-off"], ["ours-fp32", "ours-fp32-off"], ["genai-int4", "genai-fp32"]]
    if not args.skip_optimum:
        export(target, pack, work / "steered-optimum-fp32")
        contestants.append({"name": "optimum-fp32", "kind": "ours", "model": str(work / "steered-optimum-fp32"),
                            "gate": 1})
        ratios += [["ours-fp32", "optimum-fp32"], ["optimum-fp32", "genai-fp32"]]
    if not args.skip_llamacpp:
        files = gguf(python, target, work)
        for kind, path in files.items():
            contestants.append({"name": f"llamacpp-{kind}", "kind": "llamacpp", "model": str(path),
                                "python": str(python)})
        if files:
            ratios += [["ours-int4", "llamacpp-q4_0"], ["ours-fp32", "llamacpp-f32"]]
    config = {"contestants": contestants, "ratios": ratios}
    (work / "bench.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {work / 'bench.json'} ({len(contestants)} contestants)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
