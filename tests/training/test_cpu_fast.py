"""The cpu-fast recipe: the cached frozen trunk equals a fresh forward pass, is reused
and rebuilt when it must be, and a run trained on it serves the same probabilities
through Predictor as it validated with; --resume repeats the uninterrupted run."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pneumoscope.training.trunk as trunk_mod
from pneumoscope.data.augment import PRESETS, augment_batch
from pneumoscope.data.cache import DecodedSet, decode_samples
from pneumoscope.data.discover import discover_split
from pneumoscope.data.manifest import read_manifest
from pneumoscope.errors import UserError
from pneumoscope.evaluation.metrics import DEFAULT_THRESHOLD_RULE, SENSITIVITY_RULES
from pneumoscope.inference import Predictor, predict_probs
from pneumoscope.models import build_model
from pneumoscope.models.classifier import images_to_input
from pneumoscope.rundir import BEST_MODEL, METRICS, THRESHOLD, VAL_PREDICTIONS
from pneumoscope.training import TrainConfig, fit, trunk_engine
from pneumoscope.training.trunk import TRUNK_BATCH, CachedTrunk, FrozenTrunk, view_generator
from pneumoscope.training.trunk_engine import resolve_trunk_engine, resolve_trunk_precision

SIZE, K = 64, 7  # stem + blocks0..5 frozen and cached; blocks6 + head trained
FAST = dict(
    backbone="efficientnet_lite0",
    image_size=SIZE,
    batch_size=8,
    val_fraction=0.25,
    epochs=2,
    views=2,
    trunk_precision="fp32",
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", weights="imagenet").eval()


@pytest.fixture(scope="module")
def sets(small_data_root):
    samples = discover_split(small_data_root / "train", "train")
    data = decode_samples(samples, SIZE, show_progress=False, cache_dir=False)
    return data, decode_samples(samples[::4], SIZE, show_progress=False, cache_dir=False)


@pytest.fixture
def trunk_calls(monkeypatch):
    """Counts trunk passes (activation cache misses)."""
    calls = []
    real = trunk_mod.trunk_activations

    def counting(*args, **kw):
        calls.append(kw.get("desc"))
        return real(*args, **kw)

    monkeypatch.setattr(trunk_mod, "trunk_activations", counting)
    return calls


def cached(model, sets, cache_dir, precision="fp32", **kw):
    train_set, val_set = sets
    return CachedTrunk(
        model,
        K,
        train_set,
        val_set,
        augment=PRESETS["medium"],
        views=2,
        seed=3,
        precision=precision,
        device=torch.device("cpu"),
        cache_dir=cache_dir,
        show_progress=False,
        **kw,
    )


@torch.inference_mode()
def fresh(model, images, augment=None, seed=3, view=None):
    """The trunk's output the plain way: the model's own stages, unfolded, fp32, NCHW."""
    gen = view_generator(seed, view) if augment else None
    out = []
    for start in range(0, len(images), TRUNK_BATCH):
        x = images_to_input(images[start : start + TRUNK_BATCH])
        if augment:
            x = augment_batch(x, augment, gen)
        out.append(model.features_until(K, x))
    return torch.cat(out).permute(0, 2, 3, 1).numpy()  # stored layout: (N, H, W, C)


def assert_close(stored, expected, rel):
    stored = np.asarray(stored, dtype=np.float32)
    err = np.linalg.norm(stored - expected) / np.linalg.norm(expected)
    assert err < rel, err


def test_cached_activations_equal_a_fresh_forward_pass(model, sets, tmp_path):
    ct = cached(model, sets, tmp_path / "cache")
    train_set, val_set = sets
    assert len(ct.train_views) == 3  # clean + 2 augmented views
    assert ct.val_acts.dtype == np.float16
    assert_close(ct.val_acts, fresh(model, val_set.images), 2e-3)  # fp16 storage, folded BN
    assert_close(ct.train_views[0], fresh(model, train_set.images), 2e-3)
    for v in range(2):
        assert_close(
            ct.train_views[v + 1], fresh(model, train_set.images, PRESETS["medium"], view=v), 2e-3
        )
    # augmented views really differ from the clean one and from each other
    assert not np.allclose(ct.train_views[1], ct.train_views[0], atol=1e-2)
    assert not np.allclose(ct.train_views[1], ct.train_views[2], atol=1e-2)


def test_onnxruntime_trunk_equals_a_fresh_forward_pass(
    model, sets, tmp_path, trunk_calls, monkeypatch
):
    batches = []
    real_call = trunk_engine.OnnxTrunk.__call__
    monkeypatch.setattr(
        trunk_engine.OnnxTrunk,
        "__call__",
        lambda self, x: batches.append(len(x)) or real_call(self, x),
    )
    ct = cached(model, sets, tmp_path / "cache", engine="onnxruntime")
    # every pass ran in onnxruntime
    assert sum(batches) == len(sets[1].images) + 3 * len(sets[0].images)
    train_set, val_set = sets
    assert_close(ct.val_acts, fresh(model, val_set.images), 2e-3)
    assert_close(ct.train_views[2], fresh(model, train_set.images, PRESETS["medium"], view=1), 2e-3)
    trunk_calls.clear()
    torch_run = cached(model, sets, tmp_path / "cache", engine="torch")
    assert len(trunk_calls) == 4  # the engines' activations are kept apart in the cache
    assert_close(ct.train_views[1], torch_run.train_views[1].astype(np.float32), 2e-3)


def test_onnxruntime_trunk_threads_sleep_between_runs(model):
    """torch augments the next batch between runs: the session's threads must not spin on its cores."""
    session = trunk_engine.OnnxTrunk(FrozenTrunk(model, K)).session
    assert (
        session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        == "0"
    )


def top_step(top, act, y):
    """Logits and the gradients of every trainable top parameter after one backward pass
    (the same dropout masks on every call)."""
    torch.manual_seed(1)
    logits = top(act)
    torch.nn.functional.cross_entropy(logits, y).backward()
    return logits.detach(), {
        n: p.grad.clone() for n, p in top.named_parameters() if p.grad is not None
    }


def test_cpu_top_feeds_its_last_batchnorm_contiguous_with_the_same_numbers():
    torch.manual_seed(0)
    plain = build_model("efficientnet_lite0", weights="none").train()
    hooked = copy.deepcopy(plain)
    for net in (plain, hooked):
        for p in net.parameters():
            p.requires_grad_(False)
        for p in net.stages[K:].parameters():
            p.requires_grad_(True)
    seen = []
    last_norm = [m for m in hooked.stages[K:].modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
    top = trunk_mod.TopNet(hooked, K, torch.device("cpu"))
    last_norm.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].is_contiguous()))
    # what the cached trunk feeds: (B, H, W, C) float16 activations as a channels_last view
    act = trunk_mod.activations_to_input(
        np.random.default_rng(0).normal(size=(6, 2, 2, 192)).astype(np.float16), "cpu"
    )
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    want_logits, want_grads = top_step(trunk_mod.TopNet(plain, K), act, y)
    got_logits, got_grads = top_step(top, act, y)
    assert seen == [True]  # the hook ran and the BatchNorm saw a contiguous input
    assert plain.stages[-1].bn2.weight.grad is not None and set(got_grads) == set(want_grads)
    assert torch.allclose(got_logits, want_logits, atol=1e-5)
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, rtol=1e-4, atol=1e-6), name
    hooked.eval()
    with torch.no_grad():
        top(act)
    assert seen[-1] is False  # eval mode (inference) is left as it was: channels_last through


def test_cpu_top_runs_its_5x5_depthwise_convs_in_fp32_inside_a_bf16_step():
    """--trainable-stages 3 on Lite0 trains blocks5 (5x5 depthwise convolutions): in a bf16
    training step on a CPU they run in fp32; eval mode, 3x3 ones, the rest of the step and
    the weights stay as they were."""
    import pickle

    torch.manual_seed(0)
    plain = build_model("efficientnet_lite0", weights="none").train()
    swapped = copy.deepcopy(plain)
    k = plain.n_stages - 3
    top = trunk_mod.TopNet(swapped, k, torch.device("cpu"))

    def depthwise(net):
        return [
            m
            for m in net.stages[k:].modules()
            if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1
        ]

    wide = [m for m in depthwise(swapped) if m.kernel_size == (5, 5)]
    narrow = [m for m in depthwise(swapped) if m.kernel_size == (3, 3)]
    assert len(wide) == 4 and len(narrow) == 1  # blocks5: four 5x5; blocks6: one 3x3
    assert all(isinstance(m, trunk_mod._Fp32WhileTraining) for m in wide)
    assert not any(isinstance(m, trunk_mod._Fp32WhileTraining) for m in narrow)
    assert list(swapped.state_dict()) == list(plain.state_dict())
    dtypes = {}

    def record_dtype(key):
        return lambda mod, inputs, out: dtypes.__setitem__(key, out.dtype)

    hooks = [
        m.register_forward_hook(record_dtype(id(m)))
        for m in wide + narrow + [swapped.stages[-1].conv_head]
    ]
    act = torch.randn(4, 112, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = top(act)
    assert {dtypes[id(m)] for m in wide} == {torch.float32}
    assert {dtypes[id(m)] for m in narrow} == {torch.bfloat16}
    assert dtypes[id(swapped.stages[-1].conv_head)] == torch.bfloat16  # the step itself stays bf16
    logits.float().sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.dtype == torch.float32 for m in wide)
    swapped.eval()
    plain.load_state_dict(swapped.state_dict())  # the running statistics the step updated
    plain.eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            top(act)
        assert {dtypes[id(m)] for m in wide} == {torch.bfloat16}  # eval: the base class's path
        assert torch.equal(top(act), trunk_mod.TopNet(plain, k)(act))
    for hook in hooks:
        hook.remove()
    copied = pickle.loads(pickle.dumps(swapped))  # module-level classes: a copy keeps working
    assert type(copied.stages[k][0].conv_dw) is type(swapped.stages[k][0].conv_dw)


def test_an_engine_that_disagrees_with_torch_stops_the_run(model, sets, tmp_path, monkeypatch):
    import pneumoscope.models.onnx_session as onnx_session

    real_open = onnx_session.open_session

    class Skewed:  # an onnxruntime session whose output is off by 0.5
        def __init__(self, *args, **kwargs):
            self.session = real_open(*args, **kwargs)
            self.get_inputs = self.session.get_inputs

        def run(self, *args):
            return [out + 0.5 for out in self.session.run(*args)]

    monkeypatch.setattr(onnx_session, "open_session", Skewed)
    with pytest.raises(
        trunk_engine.TrunkEngineError, match="differs from torch's; run with --trunk-engine torch"
    ):
        cached(model, sets, tmp_path / "cache", engine="onnxruntime")
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing of it was stored


def test_trunk_engine_resolution():
    cpu = torch.device("cpu")
    # installed with the test extras
    assert resolve_trunk_engine("auto", cpu, "fp32") == "onnxruntime"
    assert resolve_trunk_engine("auto", cpu, "bf16") == "torch"
    assert resolve_trunk_engine("auto", torch.device("cuda"), "fp32") == "torch"
    assert resolve_trunk_engine("torch", cpu, "fp32") == "torch"
    with pytest.raises(ValueError, match="fp32 trunk pass on a CPU"):
        resolve_trunk_engine("onnxruntime", cpu, "bf16")
    with pytest.raises(ValueError, match="unknown trunk engine"):
        resolve_trunk_engine("tensorrt", cpu, "fp32")
    # a resumed run keeps its engine
    assert resolve_trunk_engine("auto", cpu, "fp32", saved="torch") == "torch"
    assert resolve_trunk_engine("auto", cpu, "fp32", saved="onnxruntime") == "onnxruntime"


def test_trunk_precision_resolution(monkeypatch):
    cpu = torch.device("cpu")
    # onnxruntime runs: its fp32 pass is the fast one
    assert resolve_trunk_precision("auto", cpu) == "fp32"
    assert (
        resolve_trunk_precision("bf16", cpu) == "bf16"
        and resolve_trunk_precision("fp32", cpu) == "fp32"
    )
    # a resumed run keeps its precision
    assert resolve_trunk_precision("auto", cpu, saved="bf16") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    # --trunk-engine torch: no onnxruntime pass to be fp32 for, so torch's bf16 where native
    assert resolve_trunk_precision("auto", cpu, engine="torch") == "bf16"
    assert resolve_trunk_precision("auto", cpu, engine="onnxruntime") == "fp32"
    monkeypatch.setattr(trunk_engine, "onnxruntime_available", lambda: False)
    assert resolve_trunk_precision("auto", cpu) == "bf16"  # no onnxruntime: bf16 where native
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_trunk_precision("auto", cpu) == "fp32"
    with pytest.raises(ValueError, match="--trunk-precision must be one of"):
        resolve_trunk_precision("fp16", cpu)


def test_a_refused_engine_leaves_the_run_it_would_overwrite(small_data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    kept = {name: f"{name} of the earlier run" for name in (BEST_MODEL, THRESHOLD, "summary.json")}
    for name, text in kept.items():
        (out / name).write_text(text)
    cfg = TrainConfig(
        data=str(small_data_root),
        out=str(out),
        **{**FAST, "trunk_precision": "bf16"},
        trunk_engine="onnxruntime",
    )
    with pytest.raises(ValueError, match="fp32 trunk pass on a CPU"):
        fit(cfg, show_progress=False, overwrite=True)
    assert {p.name: p.read_text() for p in out.iterdir()} == kept


def test_a_run_from_before_trunk_engine_resumes_in_torch(small_data_root, tmp_path):
    out = tmp_path / "run"
    options = dict(data=str(small_data_root), out=str(out), **FAST)
    assert (
        fit(TrainConfig(**options, trunk_engine="torch"), show_progress=False, stop_after_epochs=1)
        is None
    )
    config = json.loads((out / "config.json").read_text())
    # as runs before --trunk-engine wrote it
    del (
        config["trunk_engine"],
        config["requested"]["trunk_engine"],
    )
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="trunk_engine 'torch' -> 'onnxruntime'"):
        fit(TrainConfig(**options, trunk_engine="onnxruntime"), resume=True, show_progress=False)
    assert fit(TrainConfig(**options), resume=True, show_progress=False)["epochs_run"] == 2


def test_bf16_trunk_stays_close(model, sets, tmp_path):
    ct = cached(model, sets, tmp_path / "cache", precision="bf16")
    assert_close(ct.val_acts, fresh(model, sets[1].images), 0.08)


def test_folded_trunk_matches_the_model(model):
    x = torch.rand(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    trunk = FrozenTrunk(model, model.n_stages)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules()) == 0  # all folded
    with torch.inference_mode():
        torch.testing.assert_close(
            trunk(x), model.features_until(model.n_stages, x), rtol=1e-4, atol=1e-4
        )


def test_activations_are_reused_and_rebuilt(model, sets, tmp_path, trunk_calls):
    cache = tmp_path / "cache"
    first = cached(model, sets, cache)
    assert len(trunk_calls) == 4  # val clean, train clean, 2 train views
    trunk_calls.clear()
    second = cached(model, sets, cache)
    assert trunk_calls == []
    for a, b in zip(first.train_views, second.train_views):
        assert np.array_equal(a, b)
    # a damaged file fails its digest and is computed again; the rest is reused
    victim = max((cache / "trunk").glob("*.npy"), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[-7] ^= 0x55
    victim.write_bytes(bytes(raw))
    third = cached(model, sets, cache)
    assert len(trunk_calls) == 1
    for a, b in zip(first.train_views, third.train_views):
        assert np.array_equal(a, b)


def test_changed_image_or_weights_compute_anew(model, sets, tmp_path, trunk_calls):
    cache = tmp_path / "cache"
    cached(model, sets, cache)
    trunk_calls.clear()
    train_set, val_set = sets
    changed = DecodedSet(
        images=train_set.images.copy(),
        samples=train_set.samples,
        failures=[],
        keys=list(train_set.keys),
    )
    changed.images[0] = 255 - changed.images[0]
    changed.keys[0] = "another-content"
    cached(model, (changed, val_set), cache)
    assert len(trunk_calls) == 3  # every train view; the validation view is unchanged
    trunk_calls.clear()
    other = build_model("efficientnet_lite0", weights="none")
    cached(other, sets, cache)
    assert len(trunk_calls) == 4


def test_epoch_views_are_seeded_by_epoch(model, sets, tmp_path):
    ct = cached(model, sets, tmp_path / "cache")
    idx = np.arange(len(ct.train_labels))
    a, b, c = ct.feed(0), ct.feed(0), ct.feed(1)
    assert np.array_equal(a.choice, b.choice) and not np.array_equal(a.choice, c.choice)
    assert set(np.unique(a.choice)) == {0, 1, 2}
    x, y = a(idx[:5])
    assert x.shape == (5, *ct.train_views[0].shape[3:], *ct.train_views[0].shape[1:3])
    assert y.tolist() == sets[0].labels[:5].tolist()
    for i in range(5):
        expected = ct.train_views[a.choice[i]][i].astype(np.float32)
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), expected)


# ----------------------------------------------------------------------------- the recipe


def test_recipe_resolution():
    cfg = TrainConfig(data="", out="", device="cpu")
    assert (
        cfg.recipe == "cpu-fast"
        and cfg.backbone == "efficientnet_lite0"
        and cfg.trainable_stages >= 1
    )
    full = TrainConfig(data="", out="", device="cpu", recipe="full")
    assert full.recipe == "full" and full.trainable_stages == -1 and full.backbone == "auto"
    assert TrainConfig(data="", out="", device="cpu", weights="none").recipe == "full"
    assert TrainConfig(data="", out="", device="cpu", epochs=3).epochs == 3  # a set option wins
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig(data="", out="", recipe="fastest")
    with pytest.raises(ValueError, match="--recipe full"):
        TrainConfig(data="", out="", device="cpu", recipe="cpu-fast", trainable_stages=-1)


@pytest.fixture(scope="module")
def fast_run(small_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu_fast") / "run"
    summary = fit(TrainConfig(data=str(small_data_root), out=str(out), **FAST), show_progress=False)
    return out, summary


def test_saved_model_reproduces_validation_through_predictor(fast_run):
    run, summary = fast_run
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == "cpu-fast" and config["views"] == 2
    assert config["trunk_engine"] == "onnxruntime" and config["requested"]["trunk_engine"] == "auto"
    predictor = Predictor.from_run(run, device="cpu")
    assert type(predictor.model).__name__ == "Classifier"  # the whole model, not the top
    val = read_manifest(run / "manifest.csv")["val"]
    data = decode_samples(val, SIZE, show_progress=False)
    probs = predictor.predict_images(data.images)
    with open(run / VAL_PREDICTIONS) as f:
        written = {r["path"]: float(r["p_pneumonia"]) for r in csv.DictReader(f)}
    assert len(written) == len(data.samples)
    for sample, p in zip(data.samples, probs):
        assert p == pytest.approx(written[str(sample.path)], abs=2e-6)
    # the loop validated on the cached clean view (fp32 trunk here): the whole model in
    # fp32 gives the same probabilities, up to the float16 storage of the activations
    rows = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    best = rows[summary["best_epoch"] - 1]
    p32 = predict_probs(predictor.model, data.images, precision="fp32")
    y, eps = data.labels, 1e-7
    loss = float(-np.mean(y * np.log(p32 + eps) + (1 - y) * np.log(1 - p32 + eps)))
    assert loss == pytest.approx(best["val_loss"], abs=1e-3)
    assert json.loads((run / THRESHOLD).read_text())["default"] == DEFAULT_THRESHOLD_RULE
    # every sensitivity rule reaches its target on the written probabilities: a threshold is
    # one film's probability, and a rounded copy of it would fall below (6 decimals did)
    rules = json.loads((run / THRESHOLD).read_text())["rules"]
    with open(run / VAL_PREDICTIONS) as f:
        rows = list(csv.DictReader(f))
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["p_pneumonia"]) for r in rows])
    for rule, target in SENSITIVITY_RULES.items():
        assert (p[y == 1] >= rules[rule]).mean() >= target, rule


def test_fast_recipe_resume_repeats_the_run(fast_run, small_data_root, tmp_path):
    full_run, _ = fast_run
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(small_data_root), out=str(out), **FAST)
    assert fit(cfg, show_progress=False, stop_after_epochs=1) is None
    assert not (out / THRESHOLD).exists()
    fit(
        TrainConfig(data=str(small_data_root), out=str(out), **FAST),
        resume=True,
        show_progress=False,
    )
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    full = [json.loads(line) for line in (full_run / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("train_loss", "val_roc_auc", "val_loss"):
        assert rows[1][key] == pytest.approx(full[1][key], rel=1e-6), key
    # the weights, not only metrics
    got, want = (
        load_file(out / BEST_MODEL),
        load_file(full_run / BEST_MODEL),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@torch.inference_mode()
def test_the_same_files_at_another_image_size_compute_anew(
    model, sets, small_data_root, tmp_path, trunk_calls
):
    """The cache key holds the decoded size: the same files at another --image-size must not
    get the first size's activations (a 64 px run followed by a 224 px one did)."""
    cache = tmp_path / "cache"
    first = cached(model, sets, cache)
    trunk_calls.clear()
    samples = discover_split(small_data_root / "train", "train")
    bigger = tuple(
        decode_samples(s, SIZE + 32, show_progress=False, cache_dir=False)
        for s in (samples, samples[::4])
    )
    second = cached(model, bigger, cache)
    assert len(trunk_calls) == 4  # clean val, clean train and both views: nothing reused
    assert second.val_acts.shape[1:3] != first.val_acts.shape[1:3]
