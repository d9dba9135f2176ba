"""Learning-rate schedules as pure ``step -> multiplier`` functions, validated when built.

A schedule never holds a learning rate: it returns the factor by which each param group's own
initial lr is multiplied at optimizer step ``t`` (0-based: ``t`` optimizer steps have been taken
before the step that uses the value). This is the convention of torch's ``LambdaLR`` and of Hugging
Face's ``get_scheduler``, so layer-wise lr ratios survive and resuming only needs ``t``.

Two objects:

- :class:`ScheduleConfig`: every option, typed and keyword-only, checked when built (what does not
  depend on the run length) and again by :meth:`ScheduleConfig.resolve` (what does).
- :class:`Schedule`: the resolved, frozen schedule; ``schedule(t)`` is the multiplier and
  ``schedule.momentum(t)`` the cycled momentum/beta1 of ``onecycle``.

The ``plateau`` shape is driven by a metric, not only by ``t``; its rule is the pure function
:func:`plateau_update` over a small state dict (torch's ``ReduceLROnPlateau`` rule).

Example:
    >>> sched = ScheduleConfig("wsd", warmup_steps=100, decay_ratio=0.2, decay_shape="1-sqrt").resolve(1000)
    >>> [round(sched(t), 4) for t in (0, 50, 500, 900, 1000)]
    [0.0, 0.5, 1.0, 0.2929, 0.0]
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = [
    "SHAPES",
    "DecayShape",
    "Schedule",
    "ScheduleConfig",
    "Shape",
    "plateau_init",
    "plateau_update",
    "plot",
    "plot_schedule_main",
]

Shape = Literal[
    "constant",
    "linear",
    "cosine",
    "cosine_restarts",
    "polynomial",
    "inverse_sqrt",
    "exponential",
    "step",
    "multistep",
    "onecycle",
    "wsd",
    "plateau",
]
DecayShape = Literal["linear", "cosine", "1-sqrt", "exponential"]
SHAPES: tuple[str, ...] = get_args(Shape)
DECAY_SHAPES: tuple[str, ...] = get_args(DecayShape)

# Shape-specific options: which shapes read them and the default used when left at None.
# An option given to a shape that does not read it is an error (never accepted and ignored).
_SHAPE_OPTIONS: dict[str, tuple[tuple[str, ...], Any]] = {
    "decay_offset": (("cosine",), 0),
    "restart_period": (("cosine_restarts",), None),
    "period_mult": (("cosine_restarts",), 1),
    "power": (("polynomial",), 1.0),
    "timescale": (("inverse_sqrt",), None),
    "gamma": (("exponential", "step", "multistep"), None),
    "step_size": (("step",), None),
    "milestones": (("multistep",), None),
    "pct_start": (("onecycle",), 0.3),
    "anneal_strategy": (("onecycle",), "cos"),
    "div_factor": (("onecycle",), 25.0),
    "final_div_factor": (("onecycle",), 1e4),
    "three_phase": (("onecycle",), False),
    "cycle_momentum": (("onecycle",), True),
    "base_momentum": (("onecycle",), 0.85),
    "max_momentum": (("onecycle",), 0.95),
    "decay_steps": (("wsd",), None),
    "decay_ratio": (("wsd",), None),
    "decay_start": (("wsd",), None),
    "monitor": (("plateau",), "val_loss"),
    "mode": (("plateau",), "min"),
    "factor": (("plateau",), 0.1),
    "patience": (("plateau",), 10),
    "threshold": (("plateau",), 1e-4),
    "threshold_mode": (("plateau",), "rel"),
    "cooldown": (("plateau",), 0),
    "eps": (("plateau",), 1e-8),
}
# Shapes whose value depends on the run length (so they need ``total_steps``).
_NEEDS_TOTAL = ("linear", "cosine", "polynomial", "onecycle", "wsd")


def _fail(field: str, value: Any, hint: str) -> ValueError:
    return ValueError(f"LRSchedule({field}={value!r}) is invalid: {hint}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Every option of an lr schedule; the argument names are those of ``LRSchedule``.

    Args:
        shape: one of :data:`SHAPES` (default ``"cosine"``).
        warmup_steps: linear warmup length in optimizer steps (default 0). For ``onecycle`` it sets
            the rising phase instead of ``pct_start`` (torch's anneal shape, from ``1/div_factor``).
        warmup_ratio: warmup as a fraction of ``total_steps`` in ``[0, 1)``, rounded up; exclusive
            with ``warmup_steps``.
        total_steps: run length in optimizer steps; ``None`` means "known at ``resolve``" (the
            callback passes ``trainer.estimated_stepping_batches``).
        min_lr_ratio: final (``linear``, ``cosine``, ``polynomial``, ``wsd``), minimum
            (``cosine_restarts``' eta_min, ``plateau``'s min_lr) or floor (``inverse_sqrt``,
            ``exponential``, ``step``, ``multistep``) multiplier, in ``[0, 1]`` (default 0).
        warmup_init_ratio: multiplier at step 0 of the warmup, in ``[0, 1]`` (default 0, the Hugging
            Face convention; Hugging Face's ``get_wsd_schedule`` starts at ``min_lr_ratio``).
        warmup_type: ``"linear"`` (default) ``a + (1-a) t/W``; ``"linear_inclusive"``
            ``a + (1-a) (t+1)/W`` (no zero-lr first step; the peak is reached at step ``W-1``, as
            Hugging Face's ``cosine_warmup_with_min_lr``); or ``"log"`` ``a + (1-a) log(t+1)/log(W)``
            (DeepSpeed's default warmup; needs ``warmup_steps >= 2``).
        decay_shape: ``wsd`` decay: ``linear`` ``1-s``, ``cosine`` ``(1+cos(pi s))/2``, ``1-sqrt``
            ``1-sqrt(s)`` (each mapped to ``r + (1-r) f``), or ``exponential`` ``r**s`` (needs
            ``min_lr_ratio > 0``); default ``"linear"``.
        decay_steps, decay_ratio: ``wsd`` decay length in steps or as a fraction of ``total_steps``
            (rounded up, so a ratio > 0 always decays).
        decay_start: ``wsd`` step at which the decay starts (default ``total_steps - decay_steps``);
            set it on resume to start the decay now.
        decay_offset: ``cosine``: steps by which the cosine's progress is ahead,
            ``s = (t - W + decay_offset) / (T - W)`` (default 0; DeepSpeed's ``WarmupCosineLR`` is 1).
        restart_period, period_mult: ``cosine_restarts`` (SGDR) first period in steps (default the
            whole post-warmup run) and integer period multiplier (default 1).
        power: ``polynomial`` exponent (default 1.0).
        timescale: ``inverse_sqrt`` time scale (default ``warmup_steps``, or 10000 without warmup):
            ``f = 1/sqrt((t + timescale - warmup_steps) / timescale)`` after warmup.
        gamma: decay factor of ``exponential`` (required; ``gamma**(t - W)``), ``step`` and
            ``multistep`` (default 0.1).
        step_size: ``step``: multiply by ``gamma`` every ``step_size`` steps after warmup (required).
        milestones: ``multistep``: absolute steps at which the lr is multiplied by ``gamma``.
        pct_start, anneal_strategy, div_factor, final_div_factor, three_phase, cycle_momentum,
            base_momentum, max_momentum: ``onecycle``, as torch's ``OneCycleLR`` (defaults 0.3,
            ``"cos"``, 25, 1e4, False, True, 0.85, 0.95); the group's initial lr is ``max_lr``.
        monitor, mode, factor, patience, threshold, threshold_mode, cooldown, eps: ``plateau``, as
            torch's ``ReduceLROnPlateau`` (defaults ``"val_loss"``, ``"min"``, 0.1, 10, 1e-4,
            ``"rel"``, 0, 1e-8); ``eps`` compares multipliers, not absolute lrs.

    Raises:
        ValueError: an unknown shape (the known ones are listed), a value out of range, an option
            the shape does not read, warmup longer than the run, decay longer than what is left.

    Example:
        >>> round(ScheduleConfig("cosine", warmup_steps=10, min_lr_ratio=0.1).resolve(100)(55), 12)
        0.55
    """

    shape: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float | None = None
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    warmup_init_ratio: float = 0.0
    warmup_type: str = "linear"
    decay_steps: int | None = None
    decay_ratio: float | None = None
    decay_shape: str = "linear"
    decay_start: int | None = None
    decay_offset: int | None = None
    restart_period: int | None = None
    period_mult: int | None = None
    power: float | None = None
    timescale: int | None = None
    gamma: float | None = None
    step_size: int | None = None
    milestones: Sequence[int] | None = None
    pct_start: float | None = None
    anneal_strategy: str | None = None
    div_factor: float | None = None
    final_div_factor: float | None = None
    three_phase: bool | None = None
    cycle_momentum: bool | None = None
    base_momentum: float | None = None
    max_momentum: float | None = None
    monitor: str | None = None
    mode: str | None = None
    factor: float | None = None
    patience: int | None = None
    threshold: float | None = None
    threshold_mode: str | None = None
    cooldown: int | None = None
    eps: float | None = None

    def __post_init__(self) -> None:
        shape = self.shape
        if shape not in SHAPES:
            raise _fail("shape", shape, f"expected one of {', '.join(SHAPES)}")
        for name, (shapes, _) in _SHAPE_OPTIONS.items():
            if getattr(self, name) is not None and shape not in shapes:
                raise _fail(
                    name, getattr(self, name), f"only shape {' or '.join(map(repr, shapes))} reads it, not {shape!r}"
                )
        if self.milestones is not None:
            object.__setattr__(self, "milestones", tuple(self.milestones))
        if self.decay_shape not in DECAY_SHAPES:
            raise _fail("decay_shape", self.decay_shape, f"expected one of {', '.join(DECAY_SHAPES)}")
        if shape != "wsd" and self.decay_shape != "linear":
            raise _fail("decay_shape", self.decay_shape, f"only shape 'wsd' reads it, not {shape!r}")
        _check_int("warmup_steps", self.warmup_steps, low=0)
        if self.warmup_ratio is not None:
            if self.warmup_steps:
                raise _fail("warmup_ratio", self.warmup_ratio, "give warmup_steps or warmup_ratio, not both")
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise _fail("warmup_ratio", self.warmup_ratio, "it is a fraction of the run in [0, 1)")
        if self.total_steps is not None:
            _check_int("total_steps", self.total_steps, low=1)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise _fail("min_lr_ratio", self.min_lr_ratio, "it is a fraction of each group's initial lr, in [0, 1]")
        if not 0.0 <= self.warmup_init_ratio <= 1.0:
            raise _fail(
                "warmup_init_ratio", self.warmup_init_ratio, "it is a fraction of each group's initial lr, in [0, 1]"
            )
        if self.warmup_type not in ("linear", "linear_inclusive", "log"):
            raise _fail("warmup_type", self.warmup_type, "expected 'linear', 'linear_inclusive' or 'log'")
        has_warmup = bool(self.warmup_steps) or self.warmup_ratio is not None
        if self.warmup_type != "linear" and (shape == "onecycle" or not has_warmup):
            hint = "onecycle's rise follows anneal_strategy" if shape == "onecycle" else "there is no warmup"
            raise _fail("warmup_type", self.warmup_type, f"{hint}; set warmup_steps or leave warmup_type='linear'")
        if self.warmup_init_ratio != 0.0 and shape != "onecycle" and not has_warmup:
            raise _fail("warmup_init_ratio", self.warmup_init_ratio, "there is no warmup; set warmup_steps")
        if self.warmup_type == "log" and (self.warmup_ratio is not None or self.warmup_steps < 2):
            raise _fail("warmup_type", "log", "a log warmup needs warmup_steps >= 2 (not warmup_ratio)")
        if self.decay_offset is not None:
            _check_int("decay_offset", self.decay_offset, low=0)
        if shape in ("constant", "onecycle") and self.min_lr_ratio != 0.0:
            hint = (
                "a constant schedule has no decay"
                if shape == "constant"
                else "onecycle ends at 1/(div_factor*final_div_factor)"
            )
            raise _fail("min_lr_ratio", self.min_lr_ratio, hint)
        if shape == "onecycle" and self.warmup_init_ratio != 0.0:
            raise _fail("warmup_init_ratio", self.warmup_init_ratio, "onecycle starts at 1/div_factor; set div_factor")
        getattr(self, f"_check_{shape}", lambda: None)()
        if self.total_steps is not None:
            self.resolve(self.total_steps)

    def option(self, name: str) -> Any:
        """The value of a shape-specific option, or its default when left at ``None``."""
        value = getattr(self, name)
        return _SHAPE_OPTIONS[name][1] if value is None else value

    @property
    def step_gamma(self) -> float:
        """``gamma`` of ``step``/``multistep`` (default 0.1, torch's)."""
        return self.gamma if self.gamma is not None else 0.1

    # --- shape-specific checks that do not need the run length -------------------------------
    def _check_cosine_restarts(self) -> None:
        if self.restart_period is not None:
            _check_int("restart_period", self.restart_period, low=1)
        _check_int("period_mult", self.option("period_mult"), low=1)

    def _check_polynomial(self) -> None:
        if not self.option("power") > 0:
            raise _fail("power", self.power, "the polynomial exponent must be > 0")

    def _check_inverse_sqrt(self) -> None:
        if self.timescale is not None:
            _check_int("timescale", self.timescale, low=1)

    def _check_gamma(self, default: float | None) -> None:
        gamma = self.gamma if self.gamma is not None else default
        if gamma is None:
            raise _fail("gamma", None, f"shape {self.shape!r} needs gamma, the per-step decay factor, e.g. gamma=0.999")
        if not 0.0 < gamma <= 1.0:
            raise _fail("gamma", gamma, "the decay factor must be in (0, 1]")

    def _check_exponential(self) -> None:
        self._check_gamma(None)

    def _check_step(self) -> None:
        self._check_gamma(0.1)
        if self.step_size is None:
            raise _fail("step_size", None, "shape 'step' needs step_size, the steps between decays")
        _check_int("step_size", self.step_size, low=1)

    def _check_multistep(self) -> None:
        self._check_gamma(0.1)
        ms = self.milestones
        if not ms:
            raise _fail("milestones", ms, "shape 'multistep' needs a non-empty list of steps, e.g. [30000, 60000]")
        for m in ms:
            _check_int("milestones", m, low=1)
        if list(ms) != sorted(set(ms)):
            raise _fail("milestones", list(ms), "give strictly increasing steps")
        if ms[0] <= self.warmup_steps:
            raise _fail(
                "milestones", list(ms), f"the first milestone must come after the warmup ({self.warmup_steps} steps)"
            )

    def _check_onecycle(self) -> None:
        pct = self.pct_start
        if pct is not None and (self.warmup_steps or self.warmup_ratio is not None):
            raise _fail("pct_start", pct, "give pct_start or warmup_steps/warmup_ratio for onecycle, not both")
        if pct is not None and not 0.0 < pct < 1.0:
            raise _fail("pct_start", pct, "the rising fraction of the cycle must be in (0, 1)")
        if self.option("anneal_strategy") not in ("cos", "linear"):
            raise _fail("anneal_strategy", self.anneal_strategy, "expected 'cos' or 'linear'")
        for name in ("div_factor", "final_div_factor"):
            if not self.option(name) > 0:
                raise _fail(name, getattr(self, name), "must be > 0")
        if not 0.0 <= self.option("base_momentum") <= self.option("max_momentum") < 1.0:
            raise _fail("base_momentum", self.option("base_momentum"), "need 0 <= base_momentum <= max_momentum < 1")

    def _check_wsd(self) -> None:
        if self.decay_steps is None and self.decay_ratio is None:
            raise _fail("decay_steps", None, "shape 'wsd' needs decay_steps or decay_ratio (e.g. decay_ratio=0.2)")
        if self.decay_steps is not None and self.decay_ratio is not None:
            raise _fail("decay_ratio", self.decay_ratio, "give decay_steps or decay_ratio, not both")
        if self.decay_steps is not None:
            _check_int("decay_steps", self.decay_steps, low=1)
        if self.decay_ratio is not None and not 0.0 < self.decay_ratio <= 1.0:
            raise _fail("decay_ratio", self.decay_ratio, "it is a fraction of the run in (0, 1]")
        if self.decay_start is not None:
            _check_int("decay_start", self.decay_start, low=0)
            if self.decay_start < self.warmup_steps:
                raise _fail(
                    "decay_start",
                    self.decay_start,
                    f"the decay cannot start inside the warmup ({self.warmup_steps} steps)",
                )
        if self.decay_shape == "exponential" and self.min_lr_ratio <= 0.0:
            raise _fail(
                "min_lr_ratio",
                self.min_lr_ratio,
                "decay_shape='exponential' decays to min_lr_ratio geometrically; it needs min_lr_ratio > 0",
            )

    def _check_plateau(self) -> None:
        if self.option("mode") not in ("min", "max"):
            raise _fail("mode", self.mode, "expected 'min' or 'max'")
        if self.option("threshold_mode") not in ("rel", "abs"):
            raise _fail("threshold_mode", self.threshold_mode, "expected 'rel' or 'abs'")
        if not 0.0 < self.option("factor") < 1.0:
            raise _fail("factor", self.factor, "the reduction factor must be in (0, 1)")
        _check_int("patience", self.option("patience"), low=0)
        _check_int("cooldown", self.option("cooldown"), low=0)
        if self.option("threshold") < 0 or self.option("eps") < 0:
            raise _fail("threshold", self.threshold, "threshold and eps must be >= 0")

    # --- resolution ---------------------------------------------------------------------------
    @property
    def needs_total_steps(self) -> bool:
        """Whether the schedule's values depend on the run length."""
        return (
            self.shape in _NEEDS_TOTAL
            or self.warmup_ratio is not None
            or (self.shape == "cosine_restarts" and self.restart_period is None)
        )

    def resolve(self, total_steps: int | None = None) -> Schedule:
        """Fix the run length and return the frozen :class:`Schedule`.

        Args:
            total_steps: run length in optimizer steps; ``self.total_steps`` wins when set.

        Raises:
            ValueError: the run length is needed and missing, warmup longer than the run, decay
                longer than what is left after the warmup.
        """
        total = self.total_steps if self.total_steps is not None else total_steps
        if total is not None:
            total = int(total)
            _check_int("total_steps", total, low=1)
        elif self.needs_total_steps:
            raise _fail(
                "total_steps", None, f"shape {self.shape!r} with these options needs the run length; pass total_steps"
            )
        warmup = self.warmup_steps
        if self.warmup_ratio is not None:
            warmup = _ratio_steps(self.warmup_ratio, total)
        if total is not None and warmup > total:
            raise _fail("warmup_steps", warmup, f"the warmup is longer than the run ({total} steps)")
        if self.shape == "onecycle":
            pct = warmup / total if (self.warmup_steps or self.warmup_ratio is not None) else self.option("pct_start")
            if not 0.0 < pct < 1.0:
                raise _fail("warmup_steps", warmup, f"onecycle needs a rising phase inside the run ({total} steps)")
            return Schedule(self, total, 0, pct_start=pct)
        decay_steps = decay_start = 0
        if self.shape == "wsd":
            decay_steps = self.decay_steps if self.decay_steps is not None else _ratio_steps(self.decay_ratio, total)
            if decay_steps < 1:
                raise _fail("decay_ratio", self.decay_ratio, f"it gives no decay step over a run of {total} steps")
            if self.decay_start is not None:
                decay_start = self.decay_start
                if decay_start + decay_steps > total:
                    raise _fail(
                        "decay_start",
                        decay_start,
                        f"a decay of {decay_steps} steps from step {decay_start} ends after the run ({total} steps); "
                        "lengthen total_steps/max_steps or shorten decay_steps",
                    )
            else:
                decay_start = total - decay_steps
                if decay_start < warmup:
                    raise _fail(
                        "decay_steps",
                        decay_steps,
                        f"the decay is longer than what is left after {warmup} warmup steps of a {total}-step run",
                    )
        return Schedule(self, total, warmup, decay_steps=decay_steps, decay_start=decay_start)


def _ratio_steps(ratio: float, total: int) -> int:
    """``ceil(ratio * total)`` (Hugging Face Trainer's warmup rounding), robust to float noise."""
    return max(0, math.ceil(ratio * total - 1e-9))


def _check_int(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(name, value, f"expected an integer >= {low}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A resolved schedule: ``schedule(t)`` is the lr multiplier at optimizer step ``t``.

    Build it with :meth:`ScheduleConfig.resolve`. Values past ``total_steps`` stay at the final value
    for the shapes that end (``linear``, ``cosine``, ``polynomial``, ``wsd``, ``onecycle``).
    """

    config: ScheduleConfig
    total_steps: int | None
    warmup_steps: int
    decay_steps: int = 0
    decay_start: int = 0
    pct_start: float = 0.0

    @property
    def shape(self) -> str:
        return self.config.shape

    def __call__(self, step: int) -> float:
        """The multiplier of each group's initial lr for the optimizer step after ``step`` steps."""
        c, t, w = self.config, int(step), self.warmup_steps
        if t < 0:
            raise ValueError(f"Schedule step must be >= 0, got {t}")
        if c.shape == "onecycle":
            return _onecycle(self, t)[0]
        if t < w:
            if c.warmup_type == "log":
                return log_warmup_factor(t, w, c.warmup_init_ratio)
            if c.warmup_type == "linear_inclusive":
                return warmup_factor(t + 1, w, c.warmup_init_ratio)
            return warmup_factor(t, w, c.warmup_init_ratio)
        r = c.min_lr_ratio
        return getattr(self, f"_{c.shape}")(t, w, r)

    def momentum(self, step: int) -> float | None:
        """``onecycle`` with ``cycle_momentum``: the momentum/beta1 at ``step``; otherwise ``None``."""
        if self.shape != "onecycle" or not self.config.option("cycle_momentum"):
            return None
        return _onecycle(self, int(step))[1]

    def values(self, steps: int | None = None) -> list[float]:
        """The multipliers of steps ``0 .. steps-1`` (default ``total_steps``)."""
        n = self.total_steps if steps is None else steps
        if n is None:
            raise ValueError("Schedule.values needs a number of steps for a schedule without total_steps")
        return [self(t) for t in range(n)]

    def _progress(self, t: int, w: int, offset: int = 0) -> float:
        return min(float(t - w + offset) / float(max(1, self.total_steps - w)), 1.0)

    def _constant(self, t: int, w: int, r: float) -> float:
        return 1.0

    def _linear(self, t: int, w: int, r: float) -> float:
        return r + (1.0 - r) * (1.0 - self._progress(t, w))

    def _cosine(self, t: int, w: int, r: float) -> float:
        return r + (1.0 - r) * cosine_decay(self._progress(t, w, self.config.option("decay_offset")))

    def _polynomial(self, t: int, w: int, r: float) -> float:
        return r + (1.0 - r) * (1.0 - self._progress(t, w)) ** self.config.option("power")

    def _cosine_restarts(self, t: int, w: int, r: float) -> float:
        period = self.config.restart_period or max(1, self.total_steps - w)
        t_cur, mult = t - w, self.config.option("period_mult")
        while t_cur >= period:  # exact integer walk through the SGDR periods
            t_cur -= period
            period *= mult
        return r + (1.0 - r) * cosine_decay(t_cur / period)

    def _inverse_sqrt(self, t: int, w: int, r: float) -> float:
        tau = self.config.timescale or (w if w > 0 else 10_000)
        return max(r, 1.0 / math.sqrt((t + tau - w) / tau))

    def _exponential(self, t: int, w: int, r: float) -> float:
        return max(r, self.config.gamma ** (t - w))

    def _step(self, t: int, w: int, r: float) -> float:
        return max(r, self.config.step_gamma ** ((t - w) // self.config.step_size))

    def _multistep(self, t: int, w: int, r: float) -> float:
        return max(r, self.config.step_gamma ** bisect.bisect_right(self.config.milestones, t))

    def _wsd(self, t: int, w: int, r: float) -> float:
        if t < self.decay_start:
            return 1.0
        s = min(float(t - self.decay_start) / float(self.decay_steps), 1.0)
        return wsd_decay(s, self.config.decay_shape, r)

    def _plateau(self, t: int, w: int, r: float) -> float:
        return 1.0  # the metric-driven factor is applied on top by plateau_update's state


# --- the math, as plain functions of floats --------------------------------------------------
def warmup_factor(t: int, warmup_steps: int, init_ratio: float = 0.0) -> float:
    """Linear warmup ``a + (1 - a) t / W`` for ``t < W`` (``a = init_ratio``)."""
    return init_ratio + (1.0 - init_ratio) * (float(t) / float(max(1, warmup_steps)))


def log_warmup_factor(t: int, warmup_steps: int, init_ratio: float = 0.0) -> float:
    """DeepSpeed's log warmup ``a + (1 - a) log(t + 1) / log(W)`` for ``t < W``."""
    return init_ratio + (1.0 - init_ratio) * (math.log(t + 1) / math.log(warmup_steps))


def cosine_decay(s: float) -> float:
    """Half-cosine from 1 at ``s = 0`` to 0 at ``s = 1``."""
    return 0.5 * (1.0 + math.cos(math.pi * s))


def wsd_decay(s: float, shape: str, r: float) -> float:
    """WSD cooldown at progress ``s`` in ``[0, 1]`` to the floor ``r`` (Hägele et al. 2024)."""
    if shape == "exponential":
        return r**s
    f = {"linear": 1.0 - s, "cosine": cosine_decay(s), "1-sqrt": 1.0 - math.sqrt(s)}[shape]
    return r + (1.0 - r) * f


def _anneal(start: float, end: float, pct: float, strategy: str) -> float:
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def _onecycle(s: Schedule, t: int) -> tuple[float, float]:
    """torch ``OneCycleLR``'s phases, as multipliers of ``max_lr``; constant after the last step."""
    c, total = s.config, s.total_steps
    t = min(t, total - 1)
    initial = 1.0 / c.option("div_factor")
    low = initial / c.option("final_div_factor")
    m_lo, m_hi = c.option("base_momentum"), c.option("max_momentum")
    rise_end = float(s.pct_start * total) - 1
    if c.option("three_phase"):
        phases = [
            (rise_end, initial, 1.0, m_hi, m_lo),
            (2 * rise_end, 1.0, initial, m_lo, m_hi),
            (total - 1, initial, low, m_hi, m_hi),
        ]
    else:
        phases = [(rise_end, initial, 1.0, m_hi, m_lo), (total - 1, 1.0, low, m_lo, m_hi)]
    strategy, start = c.option("anneal_strategy"), 0.0
    for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
        if t <= end or i == len(phases) - 1:
            pct = (t - start) / (end - start)
            return _anneal(lr0, lr1, pct, strategy), _anneal(m0, m1, pct, strategy)
        start = end
    raise AssertionError("unreachable")


# --- plateau: torch's ReduceLROnPlateau rule as a pure update --------------------------------
def plateau_init(config: ScheduleConfig) -> dict[str, Any]:
    """The initial plateau state: ``{"best", "num_bad", "cooldown_counter", "scale"}``."""
    return {
        "best": math.inf if config.option("mode") == "min" else -math.inf,
        "num_bad": 0,
        "cooldown_counter": 0,
        "scale": 1.0,
    }


def plateau_update(config: ScheduleConfig, state: dict[str, Any], metric: float) -> dict[str, Any]:
    """One ``ReduceLROnPlateau.step(metric)``: returns the new state (the input is not changed).

    ``scale`` is the multiplier of the groups' initial lrs, never below ``min_lr_ratio``.
    """
    mode, tmode, thr = config.option("mode"), config.option("threshold_mode"), config.option("threshold")
    a, best = float(metric), state["best"]
    if mode == "min":
        better = a < best * (1.0 - thr) if tmode == "rel" else a < best - thr
    else:
        better = a > best * (thr + 1.0) if tmode == "rel" else a > best + thr
    new = dict(state)
    if better:
        new["best"], new["num_bad"] = a, 0
    else:
        new["num_bad"] += 1
    if new["cooldown_counter"] > 0:
        new["cooldown_counter"] -= 1
        new["num_bad"] = 0
    if new["num_bad"] > config.option("patience"):
        old = new["scale"]
        scale = max(old * config.option("factor"), config.min_lr_ratio)
        if old - scale > config.option("eps"):
            new["scale"] = scale
        new["cooldown_counter"], new["num_bad"] = config.option("cooldown"), 0
    return new


# --- pictures ----------------------------------------------------------------------------------
def plot(
    schedule: Schedule | ScheduleConfig,
    path: str | Path = "lr_schedule.png",
    *,
    total_steps: int | None = None,
    base_lr: float = 1.0,
    title: str | None = None,
) -> Path:
    """Write a PNG of the lr over the run.

    Args:
        schedule: a resolved :class:`Schedule` or a :class:`ScheduleConfig`.
        path: output file (default ``"lr_schedule.png"``).
        total_steps: steps to draw (default the schedule's run length; required without one).
        base_lr: the initial lr the multiplier scales (default 1.0: the multiplier itself).
        title: plot title (default a summary of the config).

    Raises:
        ModuleNotFoundError: matplotlib is missing.
        ValueError: no number of steps to draw.

    Example:
        >>> plot(ScheduleConfig("cosine", warmup_steps=100), "cos.png", total_steps=1000, base_lr=3e-4)
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "lightning_opt.schedules.plot needs matplotlib: pip install 'lightning-opt[plot]'"
        ) from err
    sched = schedule if isinstance(schedule, Schedule) else schedule.resolve(total_steps)
    n = total_steps or sched.total_steps
    if n is None:
        raise ValueError(f"plot needs total_steps for shape {sched.shape!r}")
    steps = list(range(n))
    lrs = [base_lr * sched(t) for t in steps]
    momentum = [sched.momentum(t) for t in steps] if sched.momentum(0) is not None else None
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, lrs, color="tab:blue", label="lr")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("lr" if base_lr != 1.0 else "lr multiplier")
    if momentum is not None:
        ax2 = ax.twinx()
        ax2.plot(steps, momentum, color="tab:orange", label="momentum / beta1")
        ax2.set_ylabel("momentum / beta1")
    if title is None:
        opts = {
            k: v
            for k, v in dataclasses.asdict(sched.config).items()
            if v not in (None, 0, 0.0, "linear") and k != "shape"
        }
        title = f"{sched.shape} " + ", ".join(f"{k}={v}" for k, v in opts.items())
        if sched.shape == "plateau":
            title += " (metric-driven reductions not drawn)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _config_from_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    callbacks = (data.get("trainer") or {}).get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    for cb in callbacks:
        if str(cb.get("class_path", "")).rsplit(".", 1)[-1] == "LRSchedule":
            return dict(cb.get("init_args") or {})
    raise ValueError(f"{path} has no trainer.callbacks entry with class_path ...LRSchedule")


def plot_schedule_main(argv: Sequence[str] | None = None) -> int:
    """``lightning-opt plot-schedule``: write a PNG of any schedule config.

    Either ``--config run.yaml`` (the ``LRSchedule`` entry of ``trainer.callbacks`` is read) or the
    options on the command line, named as ``LRSchedule``'s arguments (``--warmup-steps 100``).
    Command-line options override the YAML's.

    Example:
        lightning-opt plot-schedule wsd --total-steps 10000 --warmup-steps 500 --decay-ratio 0.2 \\
            --decay-shape 1-sqrt --base-lr 3e-4 -o wsd.png
    """
    parser = argparse.ArgumentParser(prog="lightning-opt plot-schedule", description="Plot an LRSchedule to a PNG.")
    parser.add_argument(
        "shape", nargs="?", default=None, choices=SHAPES, help="schedule shape (default: from --config, else cosine)"
    )
    parser.add_argument("--config", help="a LightningCLI YAML whose trainer.callbacks has an LRSchedule")
    parser.add_argument("-o", "--output", default="lr_schedule.png", help="PNG path (default lr_schedule.png)")
    parser.add_argument("--base-lr", type=float, default=1.0, help="initial lr (default 1.0: draw the multiplier)")
    parser.add_argument("--steps", type=int, default=None, help="steps to draw (default total_steps)")
    for field in dataclasses.fields(ScheduleConfig):
        if field.name == "shape":
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = str(field.type)
        if "Sequence" in kind:
            parser.add_argument(flag, type=int, nargs="+", default=None)
        elif "bool" in kind:
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=None)
        elif "int" in kind:
            parser.add_argument(flag, type=int, default=None)
        elif "float" in kind:
            parser.add_argument(flag, type=float, default=None)
        else:
            parser.add_argument(flag, type=str, default=None)
    args = vars(parser.parse_args(argv))
    options: dict[str, Any] = _config_from_yaml(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    output, base_lr, steps, shape = args.pop("output"), args.pop("base_lr"), args.pop("steps"), args.pop("shape")
    options.update({k: v for k, v in args.items() if v is not None})
    if shape is not None:
        options["shape"] = shape
    config = ScheduleConfig(**options)
    out = plot(config, output, total_steps=steps or config.total_steps, base_lr=base_lr)
    print(f"wrote {out}")
    return 0
