"""`--recipe auto`'s time budget: the cpu-fast recipe cut to what fits this CPU.

Under `--recipe auto` on a CPU (which resolves to cpu-fast), train first times, on this
very CPU and on a copy of the model (the run's own weights and BatchNorm statistics are
not touched), the two things the recipe's wall time is made of: the frozen trunk's pass
(seconds per image, on the engine and precision the run will use) and the top's training
step with its optimizer (seconds per image, at the run's batch size). From them and the
split's size it estimates the run's cold wall time (every view computed; a warm activation
cache only makes it shorter). While the estimate is over the budget it cuts, in the order
that cost least on the site sample (benchmarks/RESULTS.md, "The site sample"): the input
size 128 -> 96 px (site ROC AUC 0.982 and 0.988 against 0.986 and 0.984 at 128 px, same
seeds), then one augmented view (never the last: a run without views ranked the site at
0.895), then epochs down to MIN_EPOCHS. Options given explicitly (--image-size, --views,
--epochs, or a named --recipe) are never changed. config.json and summary.json record the
estimate, the budget and what was cut ("budget"); a cut, or an estimate still over the
budget, is a warning.

The budget is PNEUMOSCOPE_TIME_BUDGET seconds (default 300: the default recipe on the full
shared train split must finish within 5 minutes on a 2-core laptop CPU without AVX-512).
The probe reads the CPU as it is at that moment: on a busy machine it sees a slower one.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import time

import torch

log = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 300.0
MIN_EPOCHS = 4
MIN_VIEWS = 1
SMALL_IMAGE_SIZE = 96  # the first cut: the trunk's and the top's work scale with the pixels
# Start-up, the decode of a cold split (5,136 films of 224 px: about 15 s on 2 cores), the
# trunk's ONNX export and the thresholds: what the probe does not time.
OVERHEAD_S = 40.0
PROBE_BATCH = 32


def budget_seconds() -> float:
    value = os.environ.get("PNEUMOSCOPE_TIME_BUDGET", "")
    try:
        return float(value) if value else DEFAULT_BUDGET_S
    except ValueError:
        log.warning(
            "PNEUMOSCOPE_TIME_BUDGET=%r is not a number of seconds; using %g",
            value,
            DEFAULT_BUDGET_S,
        )
        return DEFAULT_BUDGET_S


def estimate_seconds(
    n_train: int, n_val: int, views: int, epochs: int, trunk_s: float, top_s: float
) -> float:
    """Cold wall time of a cpu-fast run: every train image through the trunk once clean
    and once per view, the validation images once; the top trained `epochs` times over
    the train images and scored on the validation ones (about a third of a step each)."""
    trunk = (n_train * (1 + views) + n_val) * trunk_s
    top = epochs * (n_train + n_val / 3) * top_s
    return OVERHEAD_S + trunk + top


def fit_to_budget(
    n_train: int,
    n_val: int,
    views: int,
    epochs: int,
    trunk_s: float,
    top_s: float,
    budget: float,
    fixed: frozenset[str] = frozenset(),
    image_size: int = 128,
) -> dict:
    """The cut settings {"image_size", "views", "epochs", "estimate"}: the input size first
    (to SMALL_IMAGE_SIZE; the per-image costs scale with the pixels), then views down to
    MIN_VIEWS, then epochs down to MIN_EPOCHS; names in `fixed` are left as they are."""
    size = image_size

    def estimate() -> float:
        scale = (size / image_size) ** 2
        return estimate_seconds(n_train, n_val, views, epochs, trunk_s * scale, top_s * scale)

    while estimate() > budget:
        if size > SMALL_IMAGE_SIZE and "image_size" not in fixed:
            size = SMALL_IMAGE_SIZE
        elif views > MIN_VIEWS and "views" not in fixed:
            views -= 1
        elif epochs > MIN_EPOCHS and "epochs" not in fixed:
            epochs -= 1
        else:
            break
    return {"image_size": size, "views": views, "epochs": epochs, "estimate": estimate()}


def _seconds_per_image(fn, batch: int, repeats: int = 3) -> float:
    """The median of `repeats` timed calls after one warm-up call, per image."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / batch


def probe(cfg, model, device: torch.device) -> tuple[float, float]:
    """(trunk, top) seconds per image on this CPU, as the run will compute them, timed on
    a copy of the model."""
    from pneumoscope.models.precision import autocast, resolve_precision
    from pneumoscope.training.trunk import FrozenTrunk, TopNet
    from pneumoscope.training.trunk_engine import build_engine, resolve_trunk_precision

    model = copy.deepcopy(model)  # the probe's steps must not move the run's weights or statistics
    k = model.n_stages - cfg.trainable_stages
    trunk_precision = resolve_trunk_precision(cfg.trunk_precision, device, engine=cfg.trunk_engine)
    trunk = FrozenTrunk(model, k).to(device).to(memory_format=torch.channels_last)
    engine = build_engine(trunk, cfg.trunk_engine)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(PROBE_BATCH, 1, cfg.image_size, cfg.image_size, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run_trunk():
        with autocast(device, trunk_precision):
            return engine(x)

    trunk_s = _seconds_per_image(run_trunk, PROBE_BATCH)
    act = run_trunk().float().clone()
    act = act[torch.randint(len(act), (cfg.batch_size,), generator=gen)].contiguous(
        memory_format=torch.channels_last
    )
    top = TopNet(model, k, device).train()
    optimizer = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=1e-6)
    step_precision = resolve_precision(cfg.precision, device)

    def step():
        with autocast(device, step_precision):
            loss = top(act).float().logsumexp(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    top_s = _seconds_per_image(step, cfg.batch_size)
    return trunk_s, top_s


def apply_budget(cfg, model, device: torch.device, n_train: int, n_val: int) -> dict | None:
    """Cut cfg.image_size / cfg.views / cfg.epochs (in place) to the budget where --recipe
    auto chose cpu-fast on a CPU; returns what config.json records, or None where it does
    not apply."""
    if (
        cfg.recipe != "cpu-fast"
        or cfg.recipe_requested != "auto"
        or torch.device(device).type != "cpu"
    ):
        return None
    cuttable = ("image_size", "views", "epochs")
    fixed = frozenset(name for name in cuttable if name not in cfg.recipe_filled)
    if fixed == frozenset(cuttable):
        return None
    budget = budget_seconds()
    started = time.perf_counter()
    trunk_s, top_s = probe(cfg, model, device)
    asked = {name: getattr(cfg, name) for name in cuttable}
    chosen = fit_to_budget(
        n_train, n_val, cfg.views, cfg.epochs, trunk_s, top_s, budget, fixed, cfg.image_size
    )
    for name in cuttable:
        setattr(cfg, name, chosen[name])
    record = {
        "budget_s": budget,
        "estimate_s": round(chosen["estimate"], 1),
        "recipe_values": asked,
        "chosen": {name: chosen[name] for name in cuttable},
        "trunk_ms_per_image": round(trunk_s * 1e3, 3),
        "top_ms_per_image": round(top_s * 1e3, 3),
        "probe_seconds": round(time.perf_counter() - started, 1),
        "fits": chosen["estimate"] <= budget,
    }
    cut = [f"{k} {asked[k]} -> {v}" for k, v in record["chosen"].items() if v != asked[k]]
    if cut:
        log.warning(
            "--recipe auto: %s to fit the %.0f s budget on this CPU (estimated %.0f s cold; "
            "config.json 'budget')",
            ", ".join(cut),
            budget,
            chosen["estimate"],
        )
    if not record["fits"]:
        log.warning(
            "--recipe auto: estimated %.0f s cold, over the %.0f s budget even after the cuts it may make",
            chosen["estimate"],
            budget,
        )
    return record
