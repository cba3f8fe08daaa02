"""Learning-rate schedules as LambdaLR multipliers."""

from __future__ import annotations

from collections.abc import Sequence


class LambdaLinearScheduler:
    """Per cycle of length L: linear warm-up f_start -> f_max over W steps, then f_min + (f_max - f_min)(L - n)/L at
    cycle step n (the reference's `LambdaLinearScheduler` exactly; its configs give warm-up then constant 1)."""

    def __init__(
        self,
        warm_up_steps: Sequence[int],
        f_min: Sequence[float],
        f_max: Sequence[float],
        f_start: Sequence[float],
        cycle_lengths: Sequence[float],
    ):
        lengths = {len(x) for x in (warm_up_steps, f_min, f_max, f_start, cycle_lengths)}
        if len(lengths) != 1:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle")
        for i, (w, c) in enumerate(zip(warm_up_steps, cycle_lengths)):
            if w > c:
                raise ValueError(f"cycle {i}: warm_up_steps={w} exceeds cycle_lengths={c}")
        self.warm_up_steps = list(warm_up_steps)
        self.f_min, self.f_max, self.f_start = list(f_min), list(f_max), list(f_start)
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = [0.0]
        for c in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + c)

    def _cycle(self, n: int) -> int:
        for i in range(len(self.cycle_lengths)):
            if n <= self.cum_cycles[i + 1]:
                return i
        return len(self.cycle_lengths) - 1

    def __call__(self, n: int) -> float:
        """LR multiplier at optimizer step n."""
        c = self._cycle(n)
        n = n - self.cum_cycles[c]
        if n < self.warm_up_steps[c]:
            return self.f_start[c] + (self.f_max[c] - self.f_start[c]) / self.warm_up_steps[c] * n
        length = self.cycle_lengths[c]
        return self.f_min[c] + (self.f_max[c] - self.f_min[c]) * (length - n) / length
