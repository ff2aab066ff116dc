"""The runtime protocol of docs/contract.md §5: position ids of a padded batch, the two-pass rule, what a runtime does
after the scoring prefill, and the strength schedule of decode steps. Numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --- rules -----------------------------------------------------------------------------------------------------------
def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """HF's position ids for a padded batch: the count of real tokens so far minus one; padding positions get 1
    (they are masked, so any value would do, but every part of the package must feed the same graph the same ids)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    return np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)


def two_pass_prefill(steer_layers, gate_layers) -> bool:
    """§5 rule 2 (with §5.1's g* = max G): a second, steered prefill is needed when a steered layer lies below the
    last gate layer, because those layers shifted with ``max(gate_in, 0) = 0`` during the scoring pass."""
    gates = list(gate_layers)
    return bool(gates) and any(int(l) < max(gates) for l in steer_layers)


def prefill_decision(raw_gate, score, two_pass: bool) -> tuple[np.ndarray, np.ndarray]:
    """What a runtime does after the scoring prefill (§5 rules 1 and 2, failing closed): returns each row's gate
    ``[B]`` float32 and the rows to prefill again with the gate imposed.

    A row whose score is not finite is steered (docs/contract.md). Rows that fired are prefilled again when the
    export needs it (``two_pass``), and so is every row the runtime forced: its scoring pass ran unsteered."""
    gate = np.asarray(raw_gate, dtype=np.float32).reshape(-1).copy()
    bad = ~np.isfinite(np.asarray(score, dtype=np.float32).reshape(-1))
    forced = bad & (gate <= 0.5)
    gate[bad] = 1.0
    fired = np.flatnonzero(gate > 0.5)
    return gate, fired if (two_pass or forced.any()) else fired[:0]


def shift_takes_decision(layer: int, gate_layers) -> bool:
    """SteerShift at ``layer`` takes SteerGate's decision when ``layer >= g*``, else ``max(gate_in, 0)`` (§5)."""
    return int(layer) >= max(gate_layers)


@dataclass(frozen=True)
class StrengthSchedule:
    """How strongly a steered row is shifted on each decode step (docs/contract.md "Strength schedule").

    The runtime feeds ``steer_gate_in = decision × strength(step)`` on decode step ``step`` (1 for the first token
    after the prompt; the prompt itself, step 0, gets the full strength 1). SteerShift adds ``gate · α_l·θ_l``, so the
    strength scales α: ``floor + (1 − floor) · 0.5^(step / half_life)``. ``half_life=None`` is the paper's constant
    shift. A harmless row's decision is 0 and stays 0 whatever the schedule."""

    half_life: float | None = None
    floor: float = 0.0

    def __post_init__(self):
        if self.half_life is not None and not (isinstance(self.half_life, (int, float)) and self.half_life > 0
                                               and self.half_life == self.half_life):
            raise ValueError(f"strength half_life must be a number > 0, got {self.half_life!r}")
        if not (isinstance(self.floor, (int, float)) and 0.0 <= self.floor <= 1.0):
            raise ValueError(f"strength floor must be in [0, 1], got {self.floor!r}")

    def at(self, step: int) -> float:
        if self.half_life is None or step <= 0:
            return 1.0
        return float(self.floor + (1.0 - self.floor) * 0.5 ** (step / self.half_life))

    def manifest(self) -> dict | None:
        return None if self.half_life is None else {"half_life": float(self.half_life), "floor": float(self.floor)}

    @classmethod
    def from_manifest(cls, value) -> "StrengthSchedule":
        """From the manifest's ``strength`` (absent or null: constant); the manifest loader checked the kinds."""
        return cls() if not value else cls(half_life=value["half_life"], floor=value.get("floor", 0.0))


CONSTANT_STRENGTH = StrengthSchedule()


