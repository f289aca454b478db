"""The layers that matter: a study from a trained checkpoint whose candidates read the baseline's
per-layer sensitivity shows the layers that cost most, the same in every output (terminal,
report.md, report.json, the API), and the bundled ``trained`` space that offers those dimensions."""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers import TinyCNN, make_folder

# Every candidate reads both sensitivities: the pruning allocation and the int8 fallback.
SENSITIVE_SPACE = """
prune:
  method: {value: structured-channel}
  sparsity: {choices: [0.3, 0.5]}
  allocation: {value: sensitivity}
quant:
  scheme: {value: int8-static}
  engine: {value: x86}
  observer: {value: minmax}
  keep_float: {value: 1}
"""


def test_a_checkpoint_study_shows_the_layers_that_matter_in_every_output(tmp_path, capsys):
    from recommender.api import show
    from recommender.cli import main
    from recommender.compress.checkpoint import save_state

    make_folder(tmp_path / "imgs", classes=2, per_class=40, size=(16, 16))
    torch.manual_seed(0)
    model = TinyCNN(2)
    save_state(tmp_path / "ckpt.pt", model)
    (tmp_path / "space.yaml").write_text(SENSITIVE_SPACE)
    code = main(["--model", "tests.helpers:TinyCNN", "--dataset", f"imagefolder:{tmp_path / 'imgs'}",
                 "--checkpoint", str(tmp_path / "ckpt.pt"), "--max-drop", "60%", "--budget", "20M-params",
                 "--fidelity", "smoke", "--trials", "2", "--space", str(tmp_path / "space.yaml"),
                 "--no-warm-start", "--no-latency", "--studies-dir", str(tmp_path / "studies"),
                 "--study-name", "layers", "--quiet"])
    terminal = capsys.readouterr().out
    assert code in (0, 1), terminal
    folder = tmp_path / "studies" / "layers"
    d = json.loads((folder / "report.json").read_text())
    md = (folder / "report.md").read_text()
    layers = d["layers_that_matter"]
    assert set(layers) == {"prune", "int8"}, layers
    names = {n for n, _ in model.named_modules()}
    prune, int8 = layers["prune"]["layers"], layers["int8"]["layers"]
    assert prune and int8 and all(x["layer"] in names for x in prune + int8)
    # the drops are ordered, most sensitive first, and the int8 loss changes are measured numbers
    assert [x["drop_pp"] for x in prune] == sorted((x["drop_pp"] for x in prune), reverse=True)
    assert all(isinstance(x["loss_delta"], float) for x in int8)
    assert layers["prune"]["images"] > 0 and layers["int8"]["images"] > 0
    for text in (" ".join(terminal.split()), " ".join(md.split())):
        assert "Layers that matter for pruning" in text and "Layers that matter for int8" in text
        assert f"{prune[0]['layer']} ({prune[0]['drop_pp']:+.1f} pp)" in text
        assert int8[0]["layer"] in text
    assert show("layers", studies_dir=str(tmp_path / "studies")).layers_that_matter == layers


def test_a_study_that_measures_no_sensitivity_shows_none(tmp_path):
    from tests.helpers import evaluation, synthetic_study

    from recommender.report import recommendation_from_study

    study = synthetic_study(tmp_path, base=0.9, max_drop="2%", budgets=["1M-params"],
                            cands={0: {0: evaluation(0.89, 500_000, 0.9)}})
    rec = recommendation_from_study(study)
    assert rec.layers_that_matter == {} and "Layers that matter" not in rec.explain()
    assert rec.to_dict()["layers_that_matter"] == {}


@pytest.mark.parametrize("name", ["trained", "trained.yaml"])
def test_the_trained_space_is_bundled_and_named(name):
    from recommender.search.space import SearchSpace

    space = SearchSpace.for_model("resnet101", name)
    keys = {d.key for d in space.dimensions}
    assert {"prune.allocation", "prune.round_to", "quant.keep_float", "quant.qat_epochs", "quant.observer"} <= keys
    assert not any(k.startswith("arch.") for k in keys) and not space.warm_start


def test_a_file_wins_over_a_bundled_name_and_an_unknown_name_lists_the_bundled_ones(tmp_path, monkeypatch):
    from recommender.errors import SearchSpaceError
    from recommender.search.space import SearchSpace

    monkeypatch.chdir(tmp_path)
    (tmp_path / "trained").write_text("prune:\n  method: {value: unstructured-l1}\n")
    assert [d.key for d in SearchSpace.for_model("resnet18", "trained").dimensions] == ["prune.method"]
    with pytest.raises(SearchSpaceError, match="no bundled space of that name .*trained"):
        SearchSpace.for_model("resnet18", "nosuchspace")


def test_the_search_measures_the_pruning_sensitivity_before_its_workers_start(tmp_path):
    """A space that can draw a sensitivity allocation has it measured once in the main process
    (every thread), before worker processes would wait for one of them to measure it; a space
    that cannot draw one measures nothing."""
    from recommender.compress.checkpoint import save_state
    from recommender.search.study import Search, StudySpec

    make_folder(tmp_path / "imgs", classes=2, per_class=40, size=(16, 16))
    torch.manual_seed(0)
    save_state(tmp_path / "ckpt.pt", TinyCNN(2))
    (tmp_path / "sens.yaml").write_text(SENSITIVE_SPACE)
    (tmp_path / "plain.yaml").write_text("prune:\n  method: {value: structured-channel}\n  sparsity: {value: 0.3}\n")
    for space, measured in (("plain.yaml", False), ("sens.yaml", True)):
        studies = tmp_path / f"studies-{space}"
        search = Search(StudySpec(model="tests.helpers:TinyCNN", dataset=f"imagefolder:{tmp_path / 'imgs'}",
                                  max_drop="60%", budgets=["20M-params"], fidelity="smoke", studies_dir=str(studies),
                                  latency=False, checkpoint=str(tmp_path / "ckpt.pt"), space=str(tmp_path / space)),
                        log=lambda *_: None)
        search._sensitivity_ready()
        assert bool(list(studies.rglob("prune_sensitivity_*.json"))) == measured, space
