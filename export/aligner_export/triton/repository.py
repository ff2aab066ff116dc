"""``aligner-export triton``'s model repository (issue 13, docs/serving.md).

    REPO/
      NAME/
        config.pbtxt     backend "python", decoupled, dynamic batching, instance group, parameters
        1/
          model.py       aligner_export/triton/model.py, verbatim
          export/        the export directory, copied (or referenced by absolute path in ``export_dir``)

The tensors are named as Triton's LLM backends name them, so that Triton's ``/v2/models/NAME/generate`` and
``generate_stream`` work: inputs ``text_input`` (BYTES), ``max_tokens`` (INT32), ``stream`` (BOOL),
``temperature`` and ``top_p`` (FP32), ``seed`` (UINT64), all but ``text_input`` optional; outputs ``text_output``
(BYTES), ``steer_gate`` and ``steer_score`` (FP32). A vision-language export's requests carry their images in
``text_input``'s chat messages (``image_url`` parts with ``data:`` URLs).

The export is checked before anything is written (``aligner_runtime.manifest.load_export``: the checks of
``Aligner.load``), and the repository is written atomically: a failure leaves nothing behind.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from aligner_runtime.errors import AlignerError, atomic_dir, check_count
from aligner_runtime.manifest import load_export

MODEL_FILE = Path(__file__).with_name("model.py")
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
EXPORT_SUBDIR = "export"
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}

INPUTS = (  # name, Triton type, optional
    ("text_input", "TYPE_STRING", False),
    ("max_tokens", "TYPE_INT32", True),
    ("stream", "TYPE_BOOL", True),
    ("temperature", "TYPE_FP32", True),
    ("top_p", "TYPE_FP32", True),
    ("seed", "TYPE_UINT64", True),
)
OUTPUTS = (("text_output", "TYPE_STRING", "-1"), ("steer_gate", "TYPE_FP32", "1"), ("steer_score", "TYPE_FP32", "1"))


@dataclass
class RepositoryOptions:
    """What ``config.pbtxt`` says. ``max_batch_size``: requests per ``execute`` (Triton's dynamic batcher) and rows
    of the model's continuous batch. ``copy_export=False`` references the export by absolute path."""

    name: str = "inferaligner"
    instances: int = 1
    instance_kind: str = "cpu"
    max_batch_size: int = 16
    max_queue: int = 64
    max_tokens: int = 128
    request_timeout: float = 600.0
    queue_delay_us: int = 1000
    prefill: str = "alone"
    copy_export: bool = True
    providers: tuple[str, ...] = ()
    threads: int = 0
    engine: Path | None = None
    plugins: Path | None = None
    execution_env: Path | None = None
    extra: dict = field(default_factory=dict)

    def check(self) -> "RepositoryOptions":
        if not NAME.match(self.name):
            raise AlignerError(f"model name {self.name!r} must be letters, digits, '_', '.' or '-' (at most 128)")
        check_count(self.instances, "--instances", 1, 256)
        check_count(self.max_batch_size, "--max-batch-size", 1, 4096)
        check_count(self.max_queue, "--max-queue", 0, 1 << 20)
        check_count(self.max_tokens, "--max-tokens", 1, 1 << 20)
        check_count(self.threads, "--threads", 0, 1024)
        check_count(self.queue_delay_us, "--queue-delay-us", 0, 10_000_000)
        if self.instance_kind not in INSTANCE_KINDS:
            raise AlignerError(f"--instance-kind must be one of {', '.join(INSTANCE_KINDS)}")
        if self.prefill not in ("alone", "together"):
            raise AlignerError("--prefill must be 'alone' or 'together'")
        if not self.request_timeout > 0:
            raise AlignerError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")
        if self.execution_env is not None and not Path(self.execution_env).exists():
            raise AlignerError(f"execution environment not found: {self.execution_env}")
        if self.engine is not None and not Path(self.engine).exists():
            raise AlignerError(f"engine not found: {self.engine}")
        if self.plugins is not None and not Path(self.plugins).is_file():
            raise AlignerError(f"plugin library not found: {self.plugins}")
        return self


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(options: RepositoryOptions, export_ref: str) -> str:
    """``config.pbtxt`` for the model."""
    lines = ["# Written by aligner-export triton: InferAligner steering always on (docs/serving.md).",
             f"name: {_quote(options.name)}", 'backend: "python"', f"max_batch_size: {options.max_batch_size}",
             "model_transaction_policy { decoupled: true }",
             f"dynamic_batching {{ max_queue_delay_microseconds: {options.queue_delay_us} }}", "input ["]
    lines += [",\n".join(f'  {{ name: "{name}" data_type: {kind} dims: [ 1 ]{" optional: true" if optional else ""} }}'
                         for name, kind, optional in INPUTS), "]", "output ["]
    lines += [",\n".join(f'  {{ name: "{name}" data_type: {kind} dims: [ {dims} ] }}' for name, kind, dims in OUTPUTS),
              "]", f"instance_group [ {{ count: {options.instances} kind: {INSTANCE_KINDS[options.instance_kind]} }} ]"]
    parameters = {"export_dir": export_ref, "max_queue": str(options.max_queue), "max_tokens": str(options.max_tokens),
                  "request_timeout": f"{options.request_timeout:g}", "prefill": options.prefill,
                  "providers": ",".join(options.providers), "threads": str(options.threads),
                  "engine": str(Path(options.engine).resolve()) if options.engine else "",
                  "plugins": str(Path(options.plugins).resolve()) if options.plugins else ""}
    if options.execution_env is not None:
        # Triton's Python backend runs the model's stub inside this environment (numpy < 2 for nvidia-pytriton's).
        parameters["EXECUTION_ENV_PATH"] = str(Path(options.execution_env).resolve())
    parameters.update(options.extra)
    for key, value in parameters.items():
        lines.append(f"parameters: {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"


def write_repository(export_dir: str | Path, repository: str | Path, options: RepositoryOptions) -> Path:
    """Writes ``repository/NAME``; returns that model directory. An existing repository gains the model; an existing
    model directory of that name is refused."""
    options.check()
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise AlignerError(f"export directory not found: {export_dir}")
    load_export(export_dir)  # refuses an unsteered, mismatched or tampered export, as Aligner.load does
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise AlignerError(f"model repository {repository} is not a directory")
    new_repository = not repository.exists()
    target = repository if new_repository else repository / options.name
    export_ref = EXPORT_SUBDIR if options.copy_export else str(export_dir.resolve())
    config = render_config(options, export_ref)
    with atomic_dir(target) as tmp:
        model_dir = tmp / options.name if new_repository else tmp
        version = model_dir / "1"
        version.mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
        shutil.copyfile(MODEL_FILE, version / "model.py")
        if options.copy_export:
            shutil.copytree(export_dir, version / EXPORT_SUBDIR)
    return repository / options.name
