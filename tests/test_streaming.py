"""Both dataset storages (in memory, streamed) behind one interface; image-folder safety; Dataset
pairs; decoding at the target size with bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from recommender.data import (ImageData, TensorData, from_datasets, load_dataset, register_dataset)
from recommender.errors import DatasetError
from recommender.streaming import StreamingData
from tests.helpers import make_folder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"))


def _all_batches(d: ImageData, res: int, augment: bool):
    g = torch.Generator().manual_seed(3)
    train = list(d.train_batches(7, res, augment=augment, generator=g, with_index=True))
    val = list(d.val_batches(5, res))
    return train, val


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_and_in_memory_folder_are_the_same_data(folder, workers):
    mem = load_dataset(f"imagefolder:{folder}", in_memory=True, num_workers=0)
    st = load_dataset(f"imagefolder:{folder}", in_memory=False, num_workers=workers)
    assert isinstance(mem, TensorData) and isinstance(st, StreamingData)
    assert mem.storage == "memory" and st.storage == "stream"
    assert mem.identity == st.identity  # one identity (cache keys) whichever storage
    assert (mem.mean, mem.std, mem.native_resolution) == (st.mean, st.std, st.native_resolution)
    assert torch.equal(mem.train_y, st.train_y) and torch.equal(mem.val_y, st.val_y)
    assert mem.n_val == 9 and mem.n_train == 27  # 25% of 12 per class
    for res, augment in ((20, True), (8, False), (12, True)):
        (mt, mv), (stt, stv) = _all_batches(mem, res, augment), _all_batches(st, res, augment)
        assert len(mt) == len(stt) and len(mv) == len(stv)
        for a, b in zip(mt + mv, stt + stv):
            assert all(torch.equal(p, q) for p, q in zip(a, b))
    ms, ss = mem.subset(10, 4), st.subset(10, 4)
    assert ms.identity == ss.identity != mem.identity
    assert torch.equal(next(ms.val_batches(4, 8))[0], next(ss.val_batches(4, 8))[0])


def test_auto_storage_follows_the_memory_bound(folder):
    small = load_dataset(f"imagefolder:{folder}", num_workers=0)
    assert isinstance(small, TensorData)
    # 36 images of 3 x 20 x 20 bytes = 43 kB: over a 0.01 MB bound they are streamed
    big = load_dataset(f"imagefolder:{folder}", memory_limit_mb=0.01, num_workers=0)
    assert isinstance(big, StreamingData) and big.identity == small.identity
    assert "streamed" in big.describe() and "in memory" in small.describe()


def test_image_size_and_default_size(tmp_path, folder):
    d = load_dataset(f"imagefolder:{folder}", num_workers=0)
    assert d.native_resolution == 20  # all 20x20 squares <= 64: native
    mixed = make_folder(tmp_path / "mixed", classes=2, per_class=4, size=(40, 30))
    assert load_dataset(f"imagefolder:{mixed}", num_workers=0).native_resolution == 32
    e = load_dataset(f"imagefolder:{folder}", image_size=12, num_workers=0)
    assert e.native_resolution == 12 and next(e.val_batches(4))[0].shape == (4, 3, 12, 12)
    assert e.identity != d.identity
    with pytest.raises(DatasetError):
        load_dataset(f"imagefolder:{folder}", image_size=2)


def test_prepared_tensors_equal_per_batch_preparation(folder):
    d = load_dataset(f"imagefolder:{folder}", num_workers=0)
    ref = TensorData(**{**{f: getattr(d, f) for f in d.__dataclass_fields__},
                        "prepared_cache_mb": 0.0})  # nothing fits: normalise + resize per batch
    assert ref.prepared("train", 8) is None
    p = d.prepared("train", 8)
    assert p is not None and p.shape == (d.n_train, 3, 8, 8) and d.prepared("train", 8) is p
    for res in (8, 16, None):
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for (x1, y1), (x2, y2) in zip(d.train_batches(6, res, generator=g1),
                                      ref.train_batches(6, res, generator=g2)):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
        for (x1, _), (x2, _) in zip(d.val_batches(4, res), ref.val_batches(4, res)):
            assert torch.equal(x1, x2)
    assert d.subset(9, 3) is d.subset(9, 3)  # memoised: its prepared tensors are kept too


def test_empty_validation_split_is_an_error(tmp_path):
    one_each = make_folder(tmp_path / "one", classes=3, per_class=1)
    with pytest.raises(DatasetError) as err:
        load_dataset(f"imagefolder:{one_each}")
    assert "validation split is empty" in str(err.value) and "\n" not in str(err.value)


def test_symlink_loops_and_duplicates_are_followed_once(tmp_path):
    root = make_folder(tmp_path / "links", classes=2, per_class=8)
    (root / "class0" / "loop").symlink_to(root / "class0", target_is_directory=True)
    (root / "class0" / "up").symlink_to(root, target_is_directory=True)
    (root / "class1" / "again.png").symlink_to(root / "class1" / "img000.png")
    (root / "class1" / "other").symlink_to(root / "class0", target_is_directory=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = load_dataset(f"imagefolder:{root}", num_workers=0)
    assert d.n_train + d.n_val == 16  # each of the 16 files once
    text = " ".join(str(w.message) for w in caught) + " ".join(d.notes)
    assert "loop" in text and "deduplicated" in text
    # no image is both a training and a validation image
    tx = {bytes(x.numpy()) for x in d.train_x}
    assert not any(bytes(x.numpy()) in tx for x in d.val_x)


def test_unreadable_image_in_a_worker_is_one_line(tmp_path):
    root = make_folder(tmp_path / "bad", classes=2, per_class=4, size=(64, 64))
    victim = root / "class1" / "img001.png"
    victim.write_bytes(victim.read_bytes()[:200])  # a valid header, truncated pixel data
    d = load_dataset(f"imagefolder:{root}", in_memory=False, num_workers=1, stats_images=1)
    with pytest.raises(DatasetError) as err:
        for _ in d.train_batches(8, augment=True, generator=torch.Generator().manual_seed(0)):
            pass
    msg = str(err.value)
    assert "img001.png" in msg and "\n" not in msg and "Traceback" not in msg


class PairPart(torch.utils.data.Dataset):
    """(float CHW image in [0, 1], label) items without a ``targets`` attribute."""

    def __init__(self, n: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, size, size, generator=g)
        self.y = torch.arange(n) % 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_dataset_pair_streams_through_a_dataloader():
    train, val = PairPart(30, 10, 0), PairPart(12, 10, 1)
    d = from_datasets(train, val, 3, name="toy", num_workers=0)
    assert isinstance(d, StreamingData) and (d.n_train, d.n_val, d.num_classes) == (30, 12, 3)
    assert d.native_resolution == 10
    again = load_dataset((train, val), num_classes=3, num_workers=2)
    assert again.identity != d.identity  # the name is part of it ("datasets" vs "toy")
    assert from_datasets(train, val, 3, name="toy", num_workers=1).identity == d.identity
    x, y = next(d.train_batches(8, 8, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32
    # the labels in the stored order are those of the items
    assert torch.equal(d.val_y, val.y[d.val_index])
    spec = register_dataset(d)
    assert spec.startswith("python:toy@") and load_dataset(spec) is d
    with pytest.raises(DatasetError):
        from_datasets(train, val)  # no class count
    with pytest.raises(DatasetError):
        from_datasets(train, PairPart(0, 10, 2), 3)


def test_training_runs_on_a_streamed_dataset(folder):
    from helpers import TinyCNN
    from recommender.protocol import get_protocol
    from recommender.train import evaluate, train_model

    d = load_dataset(f"imagefolder:{folder}", in_memory=False, num_workers=0)
    proto = get_protocol("smoke", threads=1, epochs=1, batch_size=8, augment=True, device="cpu")
    torch.manual_seed(0)
    m = TinyCNN(num_classes=3)
    r = train_model(m, d, proto)
    assert r.ok and r.steps == 4 and evaluate(m, d, proto).n == d.n_val


def test_large_images_are_resized_while_decoding(tmp_path):
    """8 JPEGs of 3000 x 3000 px (27 MB each decoded, 216 MB together; the loader before this
    change grew by 450 MB on 12 of them): loading them at 32 px must not hold them all."""
    from PIL import Image

    root = tmp_path / "large"
    ramp = (np.arange(3000) * 255 // 3000).astype(np.uint8)
    base = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, ::-1]), -1)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(base + np.uint8(40 * i + 90 * c)).save(root / f"c{c}" / f"{i}.jpg",
                                                                   quality=70)
    code = textwrap.dedent(f"""
        import resource, sys
        from recommender.data import load_dataset
        import torchvision.transforms.v2, PIL.Image  # imports before the baseline
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        d = load_dataset("imagefolder:{root}", image_size=32, in_memory=True, num_workers=0)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(d.native_resolution, d.n_train + d.n_val, (after - before) // 1024)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    size, n, grown_mb = (int(v) for v in out.stdout.split())
    assert (size, n) == (32, 8)
    assert grown_mb < 100, f"peak RSS grew by {grown_mb} MB while loading (decoded: 216 MB)"


def test_the_search_and_the_api_accept_a_dataset_object(monkeypatch, tmp_path):
    import recommender.api as api
    from recommender.search.study import Search, StudySpec

    d = from_datasets(PairPart(30, 8, 0), PairPart(12, 8, 1), 3, name="pair", num_workers=0)
    spec = register_dataset(d)
    s = Search(StudySpec(model="resnet18", max_drop="2%", budgets=["5M-params"], dataset=spec,
                         fidelity="smoke", device="cpu", studies_dir=str(tmp_path)))
    assert s.data is d and s.spec.name.startswith("resnet18-pair-")

    seen = {}

    class Stop(Exception):
        pass

    def fake_search(spec, **kw):
        seen["dataset"] = spec.dataset
        raise Stop

    monkeypatch.setattr(api, "Search", fake_search)
    with pytest.raises(Stop):
        api.recommend("resnet18", budgets=["5M-params"], dataset=d, studies_dir=str(tmp_path))
    assert load_dataset(seen["dataset"]) is d
    with pytest.raises(DatasetError):  # a bare pair needs a class count (no .classes here)
        api.recommend("resnet18", budgets=["5M-params"], dataset=(PairPart(4, 8, 0), PairPart(4, 8, 1)),
                      studies_dir=str(tmp_path))
