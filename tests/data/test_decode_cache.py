"""The persistent decode cache: reused when files are unchanged, a changed file decoded
again, damaged or half-written cache files never trusted."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

import pneumoscope.data.cache as cache_mod
from pneumoscope.data.cache import DecodeStore, UnreadableImagesError, decode_samples
from pneumoscope.data.decode import load_image
from pneumoscope.data.discover import discover_split

SIZE = 64


@pytest.fixture
def folder(tmp_path, small_data_root):
    """A private copy of 8 + 8 real train images (the tests change files in it)."""
    root = tmp_path / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((small_data_root / "train" / cls).glob("*.jpeg"))[:8]:
            shutil.copy2(f, root / cls / f.name)
    return root


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts real decodes (cache misses) made by decode_samples."""
    calls = []

    def counting(source, size, *, name=None):
        calls.append(name)
        return load_image(source, size, name=name)

    monkeypatch.setattr(cache_mod, "load_image", counting)
    return calls


def shard_files(cache_dir):
    return sorted((cache_dir / "decoded").rglob("shard-*.npy"))


def decode(folder, cache_dir, **kw):
    return decode_samples(
        discover_split(folder), SIZE, show_progress=False, cache_dir=cache_dir, **kw
    )


def test_second_run_decodes_nothing_and_matches(folder, tmp_path, decode_calls):
    cache = tmp_path / "cache"
    first = decode(folder, cache)
    assert len(decode_calls) == 16 and len(shard_files(cache)) == 1
    decode_calls.clear()
    second = decode(folder, cache)
    assert decode_calls == []
    assert np.array_equal(first.images, second.images)
    assert first.keys == second.keys and len(set(first.keys)) == 16
    # and both equal the plain decode of every file
    for image, sample in zip(second.images, second.samples):
        assert np.array_equal(image, load_image(sample.path, SIZE))


def test_changed_file_is_decoded_again(folder, tmp_path, decode_calls, small_data_root):
    cache = tmp_path / "cache"
    before = decode(folder, cache)
    target = before.samples[3].path
    # another real image, not in the set (so not in the cache), under the same name
    donor = sorted((small_data_root / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    shutil.copyfile(donor, target)
    decode_calls.clear()
    after = decode(folder, cache)
    assert decode_calls == [str(target)]
    assert np.array_equal(after.images[3], load_image(donor, SIZE))
    assert not np.array_equal(after.images[3], before.images[3])
    assert after.keys[3] != before.keys[3]
    assert np.array_equal(np.delete(after.images, 3, 0), np.delete(before.images, 3, 0))


def test_same_content_elsewhere_is_not_decoded_again(folder, tmp_path, decode_calls):
    cache = tmp_path / "cache"
    before = decode(folder, cache)
    # keyed by content, not by name
    shutil.copyfile(before.samples[12].path, before.samples[3].path)
    decode_calls.clear()
    after = decode(folder, cache)
    assert decode_calls == []
    assert after.keys[3] == after.keys[12] and np.array_equal(after.images[3], before.images[12])


def test_damaged_shard_is_rebuilt(folder, tmp_path, decode_calls, caplog):
    cache = tmp_path / "cache"
    clean = decode(folder, cache)
    (shard,) = shard_files(cache)
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF  # one flipped byte in the pixel data: same size, valid header
    shard.write_bytes(bytes(raw))
    decode_calls.clear()
    with caplog.at_level(logging.WARNING):
        again = decode(folder, cache)
    assert len(decode_calls) == 16  # nothing of the damaged shard was used
    assert np.array_equal(again.images, clean.images)
    assert "content does not match its digest" in caplog.text
    decode_calls.clear()
    decode(folder, cache)  # the rebuilt entry serves the next run
    assert decode_calls == []


@pytest.mark.parametrize("damage", ["truncate_array", "garbage_sidecar", "missing_sidecar"])
def test_broken_or_partial_entries_are_not_trusted(folder, tmp_path, decode_calls, damage):
    cache = tmp_path / "cache"
    clean = decode(folder, cache)
    (shard,) = shard_files(cache)
    if damage == "truncate_array":  # as if a copy or disk failure cut it short
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "garbage_sidecar":
        shard.with_suffix(".json").write_text("{not json")
    else:  # a shard whose sidecar was never written (killed between the two renames)
        shard.with_suffix(".json").unlink()
    decode_calls.clear()
    again = decode(folder, cache)
    assert len(decode_calls) == 16
    assert np.array_equal(again.images, clean.images)


def test_unreadable_files_are_reported_and_not_cached(folder, tmp_path, decode_calls):
    cache = tmp_path / "cache"
    bad = folder / "NORMAL" / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    data = decode(folder, cache)
    assert [p for p, _ in data.failures] == [str(bad)]
    assert len(data.samples) == len(data.keys) == len(data.images) == 16
    with pytest.raises(UnreadableImagesError, match="broken.jpeg"):
        decode(folder, cache, strict=True)
    store = DecodeStore(cache, SIZE)
    assert len(store.index) == 16  # the 16 good images, nothing for the broken one


def test_cache_can_be_switched_off(folder, tmp_path, decode_calls, monkeypatch):
    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(tmp_path / "default"))
    decode(folder, False)
    decode(folder, False)
    assert len(decode_calls) == 32
    assert not (tmp_path / "default").exists()
    decode(folder, None)  # None: the default folder ($PNEUMOSCOPE_CACHE)
    assert len(shard_files(tmp_path / "default")) == 1
