"""Dataset registry and protocol: splits, subsets, batching, errors, fidelities."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from recommender.data import find_cifar10_mini, TensorData, load_dataset, random_crop_flip, stratified_split
from recommender.errors import DatasetError, RecommenderError, UnknownNameError
from recommender.protocol import FIDELITIES, ProxyProtocol, get_protocol

torch.set_num_threads(1)




@pytest.fixture(scope="module")
def digits() -> TensorData:
    return load_dataset("digits")


# --- splits ------------------------------------------------------------------------------------

def test_digits_shape_and_metadata(digits):
    assert digits.train_x.dtype == torch.uint8 and digits.train_x.shape[1:] == (3, 8, 8)
    assert digits.n_train + digits.n_val == 1797
    assert digits.num_classes == 10 and digits.native_resolution == 8
    assert not digits.hflip and digits.crop_padding == 1
    assert len(digits.identity) == 16
    assert int(digits.train_x.max()) == 255 and int(digits.train_x.min()) == 0


def test_split_is_deterministic_and_seeded():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert a.identity == b.identity
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert a.identity != c.identity
    assert not torch.equal(a.val_y, c.val_y)
    # the raw split helper agrees with itself
    y = np.repeat(np.arange(5), 40)
    t1, v1 = stratified_split(y, 0.25, 3)
    t2, v2 = stratified_split(y, 0.25, 3)
    assert np.array_equal(t1, t2) and np.array_equal(v1, v2)
    assert set(t1).isdisjoint(v1) and len(t1) + len(v1) == len(y)


def test_split_is_stratified(digits):
    all_y = torch.cat([digits.train_y, digits.val_y])
    per_class = torch.bincount(all_y, minlength=10).numpy()
    val = torch.bincount(digits.val_y, minlength=10).numpy()
    assert np.all(np.abs(val - 0.25 * per_class) <= 1)


def test_subsets_are_stratified_nested_prefixes(digits):
    s100 = digits.subset(train_size=100, val_size=50)
    s300 = digits.subset(train_size=300, val_size=150)
    assert s100.n_train == 100 and s100.n_val == 50
    counts = torch.bincount(s100.train_y, minlength=10).numpy()
    assert counts.min() >= 9 and counts.max() <= 11
    assert torch.equal(s300.val_x[:50], s100.val_x)  # nested: same first images
    assert s100.identity != s300.identity != digits.identity
    assert digits.subset() is digits and digits.subset(10**6, 10**6) is digits


def test_normalisation_and_resize(digits):
    x, y = next(digits.train_batches(512, 8, shuffle=False))
    assert x.dtype == torch.float32 and x.shape == (512, 3, 8, 8)
    assert abs(float(x.mean())) < 0.15 and 0.85 < float(x.std()) < 1.15
    x16, _ = next(digits.val_batches(64, 16))
    assert x16.shape == (64, 3, 16, 16)


def test_batches_cover_epoch_and_are_seeded(digits):
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    b1 = [y for _, y in digits.train_batches(100, augment=True, generator=g1)]
    b2 = [y for _, y in digits.train_batches(100, augment=True, generator=g2)]
    assert sum(len(y) for y in b1) == digits.n_train
    assert all(torch.equal(p, q) for p, q in zip(b1, b2))


def test_random_crop_flip():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    same = random_crop_flip(x, 0, False)
    assert torch.equal(same, x)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, 2, True, g)
    assert out.shape == x.shape and out.dtype == x.dtype
    # every output pixel is either padding (0) or a value of the same image and channel
    for n in range(2):
        for c in range(3):
            vals = set(out[n, c].flatten().tolist()) - {0}
            assert vals <= set(x[n, c].flatten().tolist())
    # a flip only: rows reversed left-right or identical
    f = random_crop_flip(x.repeat(20, 1, 1, 1), 0, True, torch.Generator().manual_seed(1))
    flipped = [torch.equal(f[i], x[i % 2].flip(-1)) for i in range(40)]
    assert any(flipped) and not all(flipped)


# --- errors --------------------------------------------------------------------------------------

def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(err.value)
    # it names only what exists: --data-dir and the API's download=True (no --download flag)
    assert "--data-dir" in msg and "download=True" in msg and "--download" not in msg and "\n" not in msg
    from recommender.cli import build_parser

    assert "--download" not in build_parser().format_help()


def test_unknown_and_missing_specs(tmp_path):
    with pytest.raises(UnknownNameError):
        load_dataset("mnist")
    with pytest.raises(DatasetError):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DatasetError):
        load_dataset(f"imagefolder:{tmp_path}")  # exists but holds no class folders


def test_imagefolder_cifar10_mini():
    root = find_cifar10_mini()
    if root is None:
        pytest.skip("cifar10-mini not found (set RECOMMENDER_CIFAR10_MINI)")
    d = load_dataset(f"imagefolder:{root}")
    assert d.num_classes == 10 and d.native_resolution == 32 and d.hflip
    assert d.n_train + d.n_val == 3805
    assert d.classes[0] == "airplane"
    assert all(0.2 < m < 0.7 for m in d.mean) and all(0.15 < s < 0.4 for s in d.std)
    again = load_dataset(f"imagefolder:{root}")
    assert again.identity == d.identity


# --- protocol ------------------------------------------------------------------------------------

def test_fidelities_and_overrides():
    assert set(FIDELITIES) == {"smoke", "proxy", "confirm", "paper"}
    paper = get_protocol("paper")
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.batch_size, paper.epochs,
            paper.resolution, paper.pct_start) == (0.0125, 0.9, 2e-5, 128, 150, 32, 0.1)
    assert paper.train_size == 0 and paper.augment and not paper.nesterov
    p = get_protocol("proxy", epochs=3)
    assert p.epochs == 3 and p.fidelity == "proxy"
    with pytest.raises(UnknownNameError):
        get_protocol("turbo")
    with pytest.raises(UnknownNameError):
        get_protocol("proxy", epoch=3)
    with pytest.raises(RecommenderError):
        get_protocol("proxy", epochs=0)


def test_protocol_round_trip_and_key():
    p = get_protocol("proxy")
    assert ProxyProtocol.from_dict(p.to_dict()) == p
    assert p.key() == get_protocol("proxy").key()
    assert p.key().startswith("proxy-")
    assert p.replace(threads=1).key() == p.key()  # execution detail
    assert p.replace(epochs=p.epochs + 1).key() != p.key()
    assert p.replace(seed=1).key() != p.key()
    with pytest.raises(RecommenderError):
        ProxyProtocol.from_dict({**p.to_dict(), "bogus": 1})


def test_keys_of_the_named_fidelities_are_stable():
    """Cached trainings and stored references are found by these keys: a field added later is
    keyed only when set, so the named fidelities keep their keys."""
    assert {n: get_protocol(n).key() for n in ("smoke", "proxy", "confirm", "paper")} == {
        "smoke": "smoke-f1d268fe2790", "proxy": "proxy-97870df2241c", "confirm": "confirm-e876d2dd6e77",
        "paper": "paper-f95b9dd48732"}
    p = get_protocol("proxy")
    assert p.replace(feature_distill_alpha=1.0).key() != p.key()
    assert p.recovery_bn_batches == 4 and p.replace(recovery_bn_batches=0).key() != p.key()


def test_candidate_only_fields_share_the_baseline():
    p = get_protocol("proxy")
    for change in ({"distill_alpha": 0.5}, {"feature_distill_alpha": 1.0}, {"recovery_epochs": 2.0},
                   {"finetune_lr": 0.01}, {"recovery_distill_alpha": 0.0}, {"recovery_bn_batches": 8}):
        assert p.replace(**change).key() != p.key()
        assert p.replace(**change).for_baseline().key() == p.key(), change
    assert p.replace(epochs=3).for_baseline().key() != p.key()  # the baseline's own training changes


def test_input_resolution():
    assert get_protocol("proxy").input_resolution(8) == 8
    assert get_protocol("proxy").input_resolution(32) == get_protocol("proxy").max_resolution
    assert get_protocol("paper").input_resolution(8) == 32
    assert get_protocol("proxy", resolution=12).input_resolution(32) == 12
