"""`--recipe auto`'s time budget: the cpu-fast recipe cut to what fits this CPU.

Under `--recipe auto` on a CPU (which resolves to cpu-fast), train first times, on this
very CPU, the two things the recipe's wall time is made of: the frozen trunk's pass
(seconds per image, on the engine and precision the run will use) and the top's training
step (seconds per image). From them and the split's size it estimates the run's cold
wall time (every view computed; a warm activation cache only makes it shorter). While the
estimate is over the budget it takes one augmented view away, then epochs down to
MIN_EPOCHS. Options given explicitly (--views, --epochs, or a named --recipe) are never
changed. config.json records the estimate, the budget and what was cut ("budget").

The budget is PNEUMOSCOPE_TIME_BUDGET seconds (default 300: the default recipe on the full
shared train split must finish within 5 minutes on a 2-core laptop CPU without AVX-512).
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 300.0
MIN_EPOCHS = 4
# Start-up, the decode of a cold split (5,136 films of 224 px: about 15 s on 2 cores), the
# trunk's ONNX export and the thresholds: what the probe does not time.
OVERHEAD_S = 40.0
PROBE_BATCH = 32


def budget_seconds() -> float:
    value = os.environ.get("PNEUMOSCOPE_TIME_BUDGET", "")
    try:
        return float(value) if value else DEFAULT_BUDGET_S
    except ValueError:
        log.warning("PNEUMOSCOPE_TIME_BUDGET=%r is not a number of seconds; using %g", value, DEFAULT_BUDGET_S)
        return DEFAULT_BUDGET_S


def estimate_seconds(n_train: int, n_val: int, views: int, epochs: int, trunk_s: float, top_s: float) -> float:
    """Cold wall time of a cpu-fast run: every train image through the trunk once clean
    and once per view, the validation images once; the top trained `epochs` times over
    the train images and scored on the validation ones (about a third of a step each)."""
    trunk = (n_train * (1 + views) + n_val) * trunk_s
    top = epochs * (n_train + n_val / 3) * top_s
    return OVERHEAD_S + trunk + top


def fit_to_budget(n_train: int, n_val: int, views: int, epochs: int, trunk_s: float, top_s: float,
                  budget: float, fixed: frozenset[str] = frozenset()) -> tuple[int, int, float]:
    """(views, epochs, estimate): views cut first (each costs a whole trunk pass), then
    epochs down to MIN_EPOCHS; names in `fixed` are left as they are."""
    estimate = estimate_seconds(n_train, n_val, views, epochs, trunk_s, top_s)
    while estimate > budget:
        if views > 0 and "views" not in fixed:
            views -= 1
        elif epochs > MIN_EPOCHS and "epochs" not in fixed:
            epochs -= 1
        else:
            break
        estimate = estimate_seconds(n_train, n_val, views, epochs, trunk_s, top_s)
    return views, epochs, estimate


def _seconds_per_image(fn, batch: int, repeats: int = 2) -> float:
    """The fastest of `repeats` timed calls after one warm-up call, per image."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best / batch


def probe(cfg, model, device: torch.device) -> tuple[float, float]:
    """(trunk, top) seconds per image on this CPU, as the run will compute them."""
    from pneumoscope.precision import autocast, resolve_precision
    from pneumoscope.training.trunk import FrozenTrunk, TopNet
    from pneumoscope.training.trunk_engine import build_engine, resolve_trunk_precision

    k = model.n_stages - cfg.trainable_stages
    trunk_precision = resolve_trunk_precision(cfg.trunk_precision, device, engine=cfg.trunk_engine)
    trunk = FrozenTrunk(model, k).to(device).to(memory_format=torch.channels_last)
    engine = build_engine(trunk, cfg.trunk_engine)
    x = torch.rand(PROBE_BATCH, 1, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run_trunk():
        with autocast(device, trunk_precision):
            return engine(x)

    trunk_s = _seconds_per_image(run_trunk, PROBE_BATCH)
    act = run_trunk().float().clone()
    top = TopNet(model, k, device).train()
    step_precision = resolve_precision(cfg.precision, device)

    def step():
        with autocast(device, step_precision):
            loss = top(act).float().logsumexp(dim=1).mean()
        loss.backward()
        top.zero_grad(set_to_none=True)

    top_s = _seconds_per_image(step, PROBE_BATCH)
    return trunk_s, top_s


def apply_budget(cfg, model, device: torch.device, n_train: int, n_val: int) -> dict | None:
    """Cut cfg.views / cfg.epochs (in place) to the budget where --recipe auto chose
    cpu-fast on a CPU; returns what config.json records, or None where it does not apply."""
    if cfg.recipe != "cpu-fast" or cfg.recipe_requested != "auto" or torch.device(device).type != "cpu":
        return None
    fixed = frozenset(name for name in ("views", "epochs") if name not in cfg.recipe_filled)
    if fixed == {"views", "epochs"}:
        return None
    budget = budget_seconds()
    trunk_s, top_s = probe(cfg, model, device)
    asked = {"views": cfg.views, "epochs": cfg.epochs}
    cfg.views, cfg.epochs, estimate = fit_to_budget(n_train, n_val, cfg.views, cfg.epochs, trunk_s, top_s,
                                                    budget, fixed)
    record = {"budget_s": budget, "estimate_s": round(estimate, 1), "recipe_values": asked,
              "chosen": {"views": cfg.views, "epochs": cfg.epochs},
              "trunk_ms_per_image": round(trunk_s * 1e3, 3), "top_ms_per_image": round(top_s * 1e3, 3),
              "fits": estimate <= budget}
    if record["chosen"] != asked:
        log.info("--recipe auto: %s for the %.0f s budget on this CPU (estimated %.0f s cold)",
                 ", ".join(f"{k} {asked[k]} -> {v}" for k, v in record["chosen"].items() if v != asked[k]),
                 budget, estimate)
    elif not record["fits"]:
        log.warning("--recipe auto: estimated %.0f s cold, over the %.0f s budget even at the least it may cut",
                    estimate, budget)
    return record
