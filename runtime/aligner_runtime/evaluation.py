"""Steered-versus-unsteered comparison, for evaluation only (docs/architecture.md §5: "Evaluation code may compare with
steering disabled only through an explicitly named switch").

:class:`UnsteeredComparison` is that switch. It runs the same prompts through the same loaded graph as
:meth:`Aligner.generate` does (the gate decides), with ``steer_gate_in = 0`` on every step, which SteerGate passes
through as the gate, so every SteerShift adds exactly zero, or with ``steer_gate_in = 1`` (the steering forced on,
for the refusal figures). ``aligner-run`` and the serving endpoints do not expose it.

Both runs keep every batch's shapes fixed until the whole batch is done (no compaction), so a gate-0 prompt's
arithmetic is the same in both, bit for bit, whatever its batch-mates do.
"""

from __future__ import annotations

from typing import Sequence

from .api import Aligner, GenerationResult
from .errors import AlignerError


class UnsteeredComparison:
    def __init__(self, aligner: Aligner):
        if not aligner.steered:
            raise AlignerError("an unsteered comparison needs a steered export")
        self.aligner = aligner

    def steered(self, prompts: Sequence[str], **options) -> list[GenerationResult]:
        return self.aligner._generate(list(prompts), compact=False, **options)

    def unsteered(self, prompts: Sequence[str], **options) -> list[GenerationResult]:
        """The same generation with the gate forced to 0: the model as if it had no steering nodes."""
        return self.aligner._generate(list(prompts), gate_override=0.0, compact=False, **options)

    def forced_open(self, prompts: Sequence[str], strength: float = 1.0, schedule=None, end_rule=None,
                    **options) -> list[GenerationResult]:
        """The same generation with the gate forced open on every row: how the steering itself answers, whatever the
        gate would decide (the steering sweep's and the refusal-quality figures). ``strength`` scales every
        steering vector (α × strength); ``schedule`` (a :class:`~aligner_runtime.contract.StrengthSchedule`) and
        ``end_rule`` (an :class:`~aligner_runtime.contract.EndRule`) replace the export's own."""
        return self.aligner._generate(list(prompts), gate_override=float(strength), compact=False, strength=schedule,
                                      end_rule=end_rule, **options)
