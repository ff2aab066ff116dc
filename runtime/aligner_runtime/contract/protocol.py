"""The runtime protocol of docs/contract.md §5: position ids of a padded batch, the two-pass rule, what a runtime does
after the scoring prefill, the strength schedule of decode steps and the end rule of a steered answer. Numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .choices import END_RULE_LIMITS

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


@dataclass(frozen=True)
class EndRule:
    """How a steered answer ends (docs/contract.md "Ending a steered answer", issue 17).

    When row ``b``'s decision is 1, the runtime adds ``slope · max(0, n − after)`` to the logit of every end-of-
    sequence token before it picks the row's new token number ``n`` (0 for the first token after the prompt). The
    refusal the shift brings back has no end-of-sequence habit of its own; a bonus that grows with the answer's length
    lets the model end at the first point where ending is already plausible (a sentence end) instead of cutting it.
    Rows whose decision is 0 are not touched at all, so harmless rows stay bit-identical. ``after=None``: no rule
    (exports made before issue 17)."""

    after: int | None = None
    slope: float = 0.0

    def __post_init__(self):
        if self.after is None:
            return
        lo, hi = END_RULE_LIMITS["after"]
        if isinstance(self.after, bool) or not isinstance(self.after, (int, np.integer)) or not lo <= self.after <= hi:
            raise ValueError(f"end rule 'after' must be an integer in [{lo}, {hi}], got {self.after!r}")
        lo, hi = END_RULE_LIMITS["slope"]
        if isinstance(self.slope, bool) or not isinstance(self.slope, (int, float, np.floating)) \
                or not lo < self.slope <= hi:
            raise ValueError(f"end rule 'slope' must be a number in ({lo:g}, {hi:g}], got {self.slope!r}")

    @property
    def active(self) -> bool:
        return self.after is not None

    def bonus(self, token_index: int) -> float:
        """The logit bonus of the end-of-sequence tokens for new token ``token_index`` of a steered row."""
        if self.after is None or token_index <= self.after:
            return 0.0
        return float(np.float32(self.slope) * np.float32(token_index - self.after))

    def apply(self, logits: np.ndarray, token_index: int, decision: float, eos_ids) -> np.ndarray:
        """``logits`` (one row, [V]) with the bonus added when the row is steered; the same array when not."""
        if not decision > 0 or not eos_ids:
            return logits
        bonus = self.bonus(token_index)
        if bonus == 0.0:
            return logits
        out = np.array(logits, dtype=np.float32, copy=True)
        out[list(eos_ids)] += np.float32(bonus)
        return out

    def manifest(self) -> dict | None:
        return None if self.after is None else {"after": int(self.after), "slope": float(self.slope)}

    @classmethod
    def from_manifest(cls, value) -> "EndRule":
        """From the manifest's ``end_rule`` (absent or null: none); the manifest loader checked the kinds."""
        return cls() if not value else cls(after=int(value["after"]), slope=float(value["slope"]))


NO_END_RULE = EndRule()
