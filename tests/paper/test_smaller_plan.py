"""A smaller plan and a second report: ``--models`` cuts each study to some of its models,
``--report-name`` writes another report beside docs/results.md, and an image folder's ``name``
is how its report names the data."""

from __future__ import annotations

import json
import shutil

import pytest

from cimsim import ConfigError
from cimsim.data import ImageFolderDataModule
from paper.driver import check_recorded, check_report_name
from paper.excerpt import excerpt, markers, update_readme
from paper.plan import CORE, STUDY, base_of, planned_runs, restricted, selected
from paper.report import dataset_name, scope_data
from reproduce import parse, reproduce

SUBSET = ("digital", "sigma0.05_L4", "sigma0.1_L4", "sigma0.15_L4")


def test_models_cut_every_study_to_the_models_named():
    cut = restricted(selected(CORE), SUBSET)
    studies = {st.name: st for sec in cut for st in sec.studies}
    assert studies["fig7"].runs == SUBSET  # the plan's order, 0.02 and 0.2 left out
    assert STUDY["fig7"].runs == (
        "digital",
        *(f"sigma{s}_L4" for s in (0.02, 0.05, 0.1, 0.15, 0.2)),
    )
    for name, st in studies.items():
        assert set(st.runs) <= set(SUBSET) and st.runs, name
        assert st.overrides == STUDY[name].overrides  # only the models change
    assert studies["bias_abs_max_unscaled"].runs == ("digital", "sigma0.1_L4")
    runs = planned_runs(cut, 3)
    assert [r.name for r in runs[:4]] == list(SUBSET)  # seed 0's models first, in plan order
    assert sorted(base_of(r.name) for r in runs) == sorted((m, k) for m in SUBSET for k in range(3))
    assert restricted(selected(CORE), None) == selected(CORE)


def test_models_a_study_cannot_compare_without_are_refused():
    with pytest.raises(ValueError, match="pcm not measured by these sections"):
        restricted(selected(("fig7",)), ("digital", "pcm"))
    with pytest.raises(ValueError, match="nope not measured"):
        restricted(selected(CORE), ("nope",))
    with pytest.raises(ValueError, match="study fig7 lacks digital"):  # the baseline
        restricted(selected(("fig7",)), ("sigma0.1_L4", "sigma0.2_L4"))
    with pytest.raises(ValueError, match="study fig7 keeps one model only"):
        restricted(selected(("fig7",)), ("digital",))
    with pytest.raises(ValueError, match="study bias_half_range_separate lacks sigma0.1_L4"):
        restricted(selected(("bias",)), ("digital", "map_abs_max_shared"))  # the authors' model
    with pytest.raises(ValueError, match="study hurt_weights keeps one model only"):
        restricted(selected(("hurts",)), ("digital",))
    with pytest.raises(ValueError, match=r"only the core sections .* not \['methods'\]"):
        restricted(selected(("fig7", "methods")), ("digital", "sigma0.1_L4"))
    with pytest.raises(ConfigError, match="--models.*pcm not measured"):
        parse(["--tiny", "--sections", "fig7", "--models", "digital,pcm"])
    args, _ = parse(["--tiny", "--sections", "fig7", "--models", "digital,sigma0.1_L4"])
    assert [st.runs for sec in args.sections for st in sec.studies] == [("digital", "sigma0.1_L4")]


def test_a_cut_plan_or_a_name_never_overwrites_a_committed_page(tmp_path):
    models = ["--sections", "fig7", "--models", "digital,sigma0.1_L4"]
    with pytest.raises(ConfigError, match="--models.*would replace the committed report"):
        parse(models)  # into docs/ as results.md: refused
    assert parse([*models, "--report-name", "mine"])[0].report_name == "mine"
    assert parse([*models, "--force"])[0].models == ("digital", "sigma0.1_L4")
    (tmp_path / "guide.md").write_text("a guide")
    with pytest.raises(ConfigError, match="--report-name.*guide.md exists and is not a report"):
        check_report_name(tmp_path, "guide", force=False)
    check_report_name(tmp_path, "guide", force=True)
    check_report_name(tmp_path, "new", force=False)  # nothing there yet
    (tmp_path / "old" / "evidence").mkdir(parents=True)
    (tmp_path / "old.md").write_text("a report")
    (tmp_path / "old" / "evidence" / "report.json").write_text("{}")
    check_report_name(tmp_path, "old", force=False)  # a report: written again


def test_report_only_writes_the_report_the_plan_was_measured_for(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"runs": {}}')
    (out / "report.json").write_text('{"report_name": "sub", "chips": 2}')
    dest = ["--report-only", "--out", str(out), "--report-dir", str(tmp_path / "d")]
    with pytest.raises(ConfigError, match="--report-name.*measured for the report 'sub'"):
        reproduce([*dest, "--report-name", "other"])
    assert not (tmp_path / "d").exists()  # refused before anything is written

    sections = [s.name for s in parse(["--sections", "fig7"])[0].sections]
    recorded = {"report_name": "sub", "chips": 2, "seeds": 3, "sections": sections}
    (out / "report.json").write_text(json.dumps(recorded))
    for option, value in (("--chips", "5"), ("--seeds", "1"), ("--sections", "fig7,hurts")):
        with pytest.raises(ConfigError, match=f"^{option}=.* were measured with .*leave {option}"):
            reproduce([*dest, option, value])
    assert not (tmp_path / "d").exists()
    args = parse([*dest, "--chips", "2", "--seeds", "3", "--sections", "fig7"])[0]
    check_recorded(args, recorded, out)  # the recorded values: accepted
    models = {**recorded, "models": ["digital", "sigma0.1_L4"]}
    cut = ["--sections", "fig7", "--models", "sigma0.1_L4,digital", "--report-name", "m"]
    check_recorded(parse([*dest, *cut])[0], models, out)  # the same models in another order
    tiny = {**recorded, "scale": "tiny (smoke test)"}
    check_recorded(parse([*dest, "--tiny", "--epochs", "1", "--force"])[0], tiny, out)
    evidence = tmp_path / "evidence"  # --from-published checks its record alike
    shutil.copytree(out, evidence)
    published = ["--report-only", "--from-published", str(evidence), "--report-dir", str(tmp_path)]
    with pytest.raises(ConfigError, match="^--chips=5 is invalid: the rows under .*evidence"):
        reproduce([*published, "--chips", "5", "--force"])


def test_an_image_folder_is_named_by_its_name_else_its_folder(tmp_path):
    spec = {"_target_": "cimsim.data.ImageFolderDataModule", "root": "/data/cifar10-subset"}
    assert dataset_name(spec) == "image folder `cifar10-subset`"
    assert dataset_name({**spec, "name": None}) == "image folder `cifar10-subset`"
    named = dataset_name({**spec, "name": "CIFAR-10 subset: batches 1-4"})
    assert named == "CIFAR-10 subset: batches 1-4 (image folder `cifar10-subset`)"
    counted = "sub: 2,728 train / 1,500 test images"  # the scope line adds a count the name lacks
    assert scope_data({"dataset": counted, "test": 1500}) == counted
    assert scope_data({"dataset": "digits", "test": 270}) == "digits (270 test images)"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
    for bad in ("", "  ", 3):
        with pytest.raises(ConfigError, match="name"):
            ImageFolderDataModule(str(tmp_path), num_workers=0, name=bad)
    dm = ImageFolderDataModule(str(tmp_path), num_workers=0, name="mine")
    assert dm.hparams["name"] == "mine"  # the checkpoint records it: the report reads it there


REPORT = """# Results

* command: `python reproduce.py x`
* date: today

## 1. Fig. 7: accuracy

**Claim.** one.

**Measured.** m.

| a | b |
|---|---|
| 1 | 2 |

**Verdict: holds at this scale.**

## 3. Fig. 9: ADC

**Claim.** three.

**Verdict: does not hold at this scale.**
"""


def test_the_excerpt_quotes_the_sections_a_report_has_under_its_own_markers(tmp_path):
    lines = excerpt(REPORT)  # sections 4 and 6 are not in this report: left out, no error
    assert lines == [
        "* command: `python reproduce.py x`",
        "* date: today",
        "",
        "**Claim.** one.",
        "",
        "**Measured.** m.",
        "",
        "| a | b |",
        "|---|---|",
        "| 1 | 2 |",
        "",
        "**Verdict: holds at this scale.**",
        "",
        "**Claim.** three.",
        "",
        "**Verdict: does not hold at this scale.**",
    ]
    report = tmp_path / "second.md"
    report.write_text(REPORT)
    (first_begin, first_end), (begin, end) = markers(), markers("second")
    readme = tmp_path / "README.md"
    text = f"top\n{first_begin}\nkept\n{first_end}\nmid\n{begin}\nold\n{end}\nbottom\n"
    readme.write_text(text)
    update_readme(readme, report, "second")
    body = "\n".join(lines).strip("\n")
    assert readme.read_text() == (
        f"top\n{first_begin}\nkept\n{first_end}\nmid\n{begin}\n{body}\n{end}\nbottom\n"
    )
    before = readme.read_text()
    update_readme(readme, report, "third")  # no markers for it: the README is left alone
    assert readme.read_text() == before
