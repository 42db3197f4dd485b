"""Learning-rate, weight-decay and EMA-momentum schedules: pure functions of the step.

One shape for all of them, the official ``WarmupThenCosine``: a linear warmup, then a cosine that is
truncated at ``truncate_cos`` of its course, so with CAPI's 0.8 it never reaches ``final_value``.
"""

import math

__all__ = ["warmup_truncated_cosine"]


def warmup_truncated_cosine(
    step: int,
    *,
    total_steps: int,
    base_value: float,
    final_value: float,
    warmup_steps: int,
    start_warmup_value: float = 0.0,
    truncate_cos: float = 0.8,
) -> float:
    """The schedule's value at ``step`` (0-based).

    - ``step < warmup_steps``: ``linspace(start_warmup_value, base_value, warmup_steps)[step]``, so step 0
      is ``start_warmup_value`` and step ``warmup_steps - 1`` is ``base_value``.
    - then, with ``i = step - warmup_steps`` and ``n = total_steps - warmup_steps``:
      ``final + (base - final) * (1 + cos(pi * truncate_cos * i / n)) / 2``, which starts at ``base_value``
      and, for ``truncate_cos < 1``, stops short of ``final_value``.
    - ``step >= total_steps``: ``final_value`` (as the official schedule does past its end).

    CAPI: lr base 1e-3, final 0, 10% warmup; EMA momentum start 1.0, base 0.999, final 1.0.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}.")
    if not 0.0 <= truncate_cos <= 1.0:
        raise ValueError(f"truncate_cos must be in [0, 1], got {truncate_cos}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if step >= total_steps:
        return float(final_value)
    if step < warmup_steps:
        if step == warmup_steps - 1:
            return float(base_value)  # linspace's endpoint, exactly
        return float(start_warmup_value + step * ((base_value - start_warmup_value) / (warmup_steps - 1)))
    i, n = step - warmup_steps, total_steps - warmup_steps
    return float(final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * truncate_cos * i / n)))
