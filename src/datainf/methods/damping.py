"""The damping lambda_l added to each block's Gauss-Newton matrix: one rule shared by all methods.

Default (the paper's, after Grosse et al. 2023), per block l with n examples of width d_l:

    lambda_l = relative * (1 / (n d_l)) * sum_i ||g_il||^2      (relative = 0.1)

i.e. ``relative`` times the mean squared gradient entry of the block. An absolute value for
every block, or one value per block, can be given instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import DataInfError
from ..options import said


@dataclass(frozen=True)
class Damping:
    """How lambda_l is chosen. Give exactly one of ``relative``, ``absolute``, ``per_block``.

    - ``relative``: lambda_l = relative * mean squared gradient entry of block l (default 0.1);
    - ``absolute``: the same lambda for every block;
    - ``per_block``: a mapping block name -> lambda_l that covers every block.
    """

    relative: float | None = None
    absolute: float | None = None
    per_block: Mapping[str, float] | None = field(default=None)

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.relative, self.absolute, self.per_block)]
        if sum(given) > 1:
            raise DataInfError(
                "Damping: give only one of relative, absolute or per_block, not several"
            )
        if not any(given):
            object.__setattr__(self, "relative", 0.1)
        for label, value in (("relative", self.relative), ("absolute", self.absolute)):
            if value is not None:
                _check_positive(f"Damping({label}={value!r})", value)
        if self.per_block is not None:
            for name, value in self.per_block.items():
                _check_positive(f"Damping(per_block) for block {name!r}", value)

    def resolve(self, mean_squares: Mapping[str, float]) -> dict[str, float]:
        """lambda_l for each block, given each block's mean squared gradient entry."""
        if self.absolute is not None:
            return {name: float(self.absolute) for name in mean_squares}
        if self.per_block is not None:
            missing = [name for name in mean_squares if name not in self.per_block]
            extra = [name for name in self.per_block if name not in mean_squares]
            if missing or extra:
                raise DataInfError(
                    f"Damping(per_block) must give exactly the gradient blocks: missing {missing}, "
                    f"unknown {extra}"
                )
            return {name: float(self.per_block[name]) for name in mean_squares}
        damping = {}
        for name, mean_square in mean_squares.items():
            value = float(self.relative) * mean_square
            if not value > 0:
                raise DataInfError(
                    f"block {name!r}: relative damping gives lambda = {value} because every "
                    "gradient entry of the block is zero; drop the block or give an absolute "
                    "damping, e.g. Damping(absolute=1e-6)"
                )
            damping[name] = value
        return damping


DAMPING_RULES = ("relative", "absolute")


def damping_rule(rule: str, value: float) -> Damping:
    """The commands' ``--damping-rule`` and ``--damping``: "relative" (lambda_l = value x block
    l's mean squared gradient entry, the paper's) or "absolute" (lambda_l = value, every block)."""
    if rule not in DAMPING_RULES:
        raise DataInfError(f"{said('damping_rule')} must be one of {', '.join(DAMPING_RULES)}, "
                           f"not {rule!r}")
    return Damping(**{rule: value})


def as_damping(damping: float | Mapping[str, float] | Damping) -> Damping:
    """A number means the relative constant; a mapping means per-block values."""
    if isinstance(damping, Damping):
        return damping
    if isinstance(damping, Mapping):
        return Damping(per_block=dict(damping))
    if isinstance(damping, (int, float)) and not isinstance(damping, bool):
        return Damping(relative=float(damping))
    raise DataInfError(
        f"damping must be a number (relative constant), a mapping block -> lambda or a Damping, "
        f"not {type(damping).__name__}"
    )


def _check_positive(label: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise DataInfError(f"{label}: damping must be a number")
    if not (math.isfinite(value) and value > 0):
        raise DataInfError(f"{label}: damping must be a finite number > 0")
