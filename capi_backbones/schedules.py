"""Linear warmup then cosine: the one home of the package's two schedules, training's and the probes'.

Both rise linearly from a start value to a base value over the warmup, then follow half a cosine wave down. They
differ in their endpoints, on purpose, because each follows the official code it must match number for number:

- :func:`warmup_truncated_cosine` (pretraining: lr, EMA momentum, clustering lr; a Python float per step) is the
  official ``WarmupThenCosine`` of CAPI's training. Its warmup ends *on* ``base_value`` (``linspace`` with both
  ends), and its cosine starts there and is *truncated*: with ``truncate_cos`` = 0.8 it covers 80% of its course
  and never reaches ``final_value``; past ``total_steps`` it gives ``final_value``.
- :func:`probe_lr_schedule` (the probes' lr multiplier; one float64 tensor for the whole run) is the official
  evaluation's table: a warmup from 0 to 1 with both ends included, then a full cosine from 1 to 0 with both ends
  included, so the first post-warmup iteration repeats 1 and the last iteration trains at lr 0.

Training reads :func:`warmup_truncated_cosine` as a function of the step, so a resumed run needs no table; the probe
table is built once by ``evals.probe_grid.train_probe_grid``. A foundation: imports nothing of the package, and torch
only inside :func:`probe_lr_schedule`.
"""

import math

__all__ = ["probe_lr_schedule", "warmup_truncated_cosine"]


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
    """The training schedule's value at ``step`` (0-based).

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


def probe_lr_schedule(iterations: int, warmup_iterations: int):
    """The probes' lr multiplier of every iteration (a float64 tensor of ``iterations`` values): ``warmup_iterations``
    values rising linearly from 0 to 1, then a cosine from 1 down to 0 (both ends included), as in the official
    evaluation."""
    import torch

    warmup = torch.linspace(0.0, 1.0, warmup_iterations, dtype=torch.float64)
    decay = (torch.cos(torch.linspace(0.0, math.pi, iterations - warmup_iterations, dtype=torch.float64)) + 1) / 2
    return torch.cat([warmup, decay])
