"""WeightsCache: keys, round trips, hits that skip training, corrupt entries retrained."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from recommender.cache import WeightsCache, cache_key
from recommender.data import load_dataset
from recommender.protocol import get_protocol
from recommender.train import evaluate, train_model

from helpers import TinyCNN  # noqa: E402

torch.set_num_threads(1)
PROTO = get_protocol("smoke", threads=1, epochs=3)




@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _key(digits, **kw):
    args = dict(model="resnet101", arch={"block": "ghost"}, protocol=PROTO, seed=0,
                dataset=digits)
    args.update(kw)
    return cache_key(**args)


def test_key_is_stable_and_sensitive(digits):
    k = _key(digits)
    assert k == _key(digits) and len(k) == 64
    assert k == WeightsCache.key("resnet101", {"block": "ghost"}, PROTO, 0, digits.identity)
    assert k != _key(digits, seed=1)
    assert k != _key(digits, arch={"block": "fire"})
    assert k != _key(digits, model="vgg19")
    assert k != _key(digits, protocol=PROTO.replace(epochs=4))
    assert k != _key(digits, dataset=digits.subset(100))
    assert k == _key(digits, protocol=PROTO.replace(threads=2))  # execution detail only


def test_round_trip_with_arrays_and_json(tmp_path):
    cache = WeightsCache(tmp_path)
    model = TinyCNN()
    key = "ab" * 32
    assert cache.load(key) is None and cache.misses == 1
    cache.save(key, model.state_dict(), {"accuracy": 0.91, "np": np.float32(0.5)})
    entry = cache.load(key)
    assert entry is not None and cache.hits == 1
    assert entry["meta"]["accuracy"] == 0.91 and entry["meta"]["np"] == 0.5
    for name, t in model.state_dict().items():
        assert torch.equal(entry["state_dict"][name], t)
    cache.save_array(key, "correct", np.array([True, False, True]))
    cache.save_array(key, "logits", torch.randn(4, 10))
    assert cache.load_array(key, "correct").tolist() == [True, False, True]
    assert cache.load_array(key, "logits").shape == (4, 10)
    assert cache.load_array(key, "missing") is None
    cache.save_json(key, "eval", {"acc": [1, 2]})
    assert cache.load_json(key, "eval") == {"acc": [1, 2]}
    assert cache.contains(key)
    leftovers = [p for p in cache.entry_dir(key).iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def _train_fn(digits, calls):
    def train(model):
        calls.append(1)
        result = train_model(model, digits, PROTO)
        ev = evaluate(model, digits, PROTO)
        return {**result.to_dict(), "accuracy": ev.accuracy}
    return train


def test_cache_hit_skips_training(tmp_path, digits):
    cache = WeightsCache(tmp_path)
    key = _key(digits)
    calls: list[int] = []
    first = cache.get_or_train(key, TinyCNN, _train_fn(digits, calls), seed=0)
    assert not first.hit and calls == [1]
    t0 = time.perf_counter()
    second = cache.get_or_train(key, TinyCNN, _train_fn(digits, calls), seed=0)
    hit_seconds = time.perf_counter() - t0
    assert second.hit and calls == [1]
    assert hit_seconds < first.seconds / 5, (hit_seconds, first.seconds)
    assert second.meta["accuracy"] == first.meta["accuracy"]
    assert evaluate(second.model, digits, PROTO).accuracy == first.meta["accuracy"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing-meta", "checksum"])
def test_corrupt_entry_is_retrained(tmp_path, digits, damage):
    cache = WeightsCache(tmp_path)
    key = _key(digits)
    calls: list[int] = []
    cache.get_or_train(key, TinyCNN, _train_fn(digits, calls), seed=0)
    d = cache.entry_dir(key)
    wpath, mpath = d / "weights.pt", d / "meta.json"
    if damage == "truncate":
        data = wpath.read_bytes()
        wpath.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        wpath.write_bytes(b"not a checkpoint")
    elif damage == "missing-meta":
        mpath.unlink()  # a partial entry: weights written, meta never
    elif damage == "checksum":
        meta = json.loads(mpath.read_text())
        meta["_cache"]["weights_sha256"] = "0" * 64
        mpath.write_text(json.dumps(meta))
    assert cache.load(key) is None  # detected, discarded, reported as a miss
    assert not d.exists()
    again = cache.get_or_train(key, TinyCNN, _train_fn(digits, calls), seed=0)
    assert not again.hit and calls == [1, 1]
    assert cache.load(key) is not None


def test_mismatched_state_dict_is_retrained(tmp_path, digits):
    cache = WeightsCache(tmp_path)
    key = _key(digits)
    cache.save(key, TinyCNN(width=8).state_dict(), {})
    calls: list[int] = []
    res = cache.get_or_train(key, TinyCNN, _train_fn(digits, calls), seed=0)
    assert not res.hit and calls == [1]


def test_corrupt_array_is_a_miss(tmp_path):
    cache = WeightsCache(tmp_path)
    key = "cd" * 32
    cache.save_array(key, "logits", np.ones((3, 2)))
    (cache.entry_dir(key) / "logits.npy").write_bytes(b"\x93NUMPY garbage")
    assert cache.load_array(key, "logits") is None
    (cache.entry_dir(key) / "bad.json").write_text("{not json")
    assert cache.load_json(key, "bad") is None


def test_invalid_names_rejected(tmp_path):
    cache = WeightsCache(tmp_path)
    with pytest.raises(ValueError):
        cache.entry_dir("../../etc")
    with pytest.raises(ValueError):
        cache.save_array("ab" * 32, "../x", np.zeros(1))


def test_a_sensitivity_is_measured_by_one_of_two_workers(tmp_path):
    """Two workers sharing a cache ask for the same int8 sensitivity at once: one measures it,
    the other waits on the side lock and reads it."""
    import threading

    import recommender.compress.quant_sensitivity as qs

    cache = WeightsCache(tmp_path)
    calls: list[int] = []
    real = qs.measure_quant_sensitivity

    def slow_measure(*a, **k):
        calls.append(1)
        time.sleep(0.3)
        return real(*a, **k)

    torch.manual_seed(0)
    model = TinyCNN(3).eval()
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,)))]
    out: list = []
    qs.measure_quant_sensitivity = slow_measure
    try:
        def worker() -> None:
            out.append(qs.cached_quant_sensitivity(cache, "ab" * 32, model, data))

        workers = [threading.Thread(target=worker) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        qs.measure_quant_sensitivity = real
    assert len(calls) == 1 and len(out) == 2 and out[0].ranking() == out[1].ranking()
