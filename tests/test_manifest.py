"""Datasets listed in a manifest: a CSV of path,label[,split] or iNaturalist's COCO-style JSON.

The images lie in one flat folder (no class folders), so only the manifest can label them.
Parsing, the one-sentence refusals, and real tiny runs from each format that train, score
the test rows behind the guard and audit.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import FAST, make_dataset, run_cli
from inat.data.dataset import check_test_set, describe_roles, scan_test_set, scan_train_set, scan_val_set
from inat.data.folder import test_access
from inat.data.manifest import read_manifest
from inat.errors import InatError
from test_faults import assert_one_error

SPECIES = ["daisy", "rose", "tulip"]
GENUS = {"daisy": "Bellis", "rose": "Rosa", "tulip": "Rosa"}  # two taxonomy levels: rose and tulip share one


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Dict[str, List[str]]:
    """``{"folder": ..., "train": [(file, species)], "test": [...]}``: 10 training and 3 test photos per
    species in one flat folder ``photos/`` (conftest's coloured stripes, a class each)."""
    base = tmp_path_factory.mktemp("manifest")
    made = make_dataset(base / "made", n_classes=3, n_train=10, n_test=3, size=32, test_name="test")
    flat = base / "data" / "photos"
    flat.mkdir(parents=True)
    out: Dict[str, List] = {"folder": base / "data"}
    for split in ("train", "test"):
        out[split] = []
        for c, species in enumerate(SPECIES):
            for src in sorted((made / split / f"class_{c}").iterdir()):
                shutil.move(str(src), flat / src.name)
                out[split].append((f"photos/{src.name}", species))
    return out


def write_csv(path: Path, rows: List[tuple], header=("path", "label", "split")) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def with_splits(photos) -> List[tuple]:
    """Training photos (every fifth one a validation row) and the test photos as split=test rows."""
    train = [(p, s, "val" if i % 5 == 0 else "train") for i, (p, s) in enumerate(photos["train"])]
    return train + [(p, s, "test") for p, s in photos["test"]]


def write_json(path: Path, rows: List[tuple], **changes) -> Path:
    """An iNaturalist-style JSON over ``rows`` (file, species), categories with name and genus."""
    data = {"info": {"year": 2021},
            "images": [{"id": 100 + i, "file_name": p, "width": 32, "height": 32} for i, (p, _) in enumerate(rows)],
            "annotations": [{"id": i, "image_id": 100 + i, "category_id": SPECIES.index(s)} for i, (_, s) in
                            enumerate(rows)],
            "categories": [{"id": i, "name": s, "genus": GENUS[s], "supercategory": "Plantae"} for i, s in
                           enumerate(SPECIES)]}
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def data_cfg(**keys) -> dict:
    return {"root": "nowhere", "manifest": None, "test_manifest": None, "label_level": "name", **keys}


# --------------------------------------------------------------------------- parsing


def test_csv_rows_labels_and_splits(photos):
    path = write_csv(photos["folder"] / "all.csv", with_splits(photos))
    cfg = data_cfg(manifest=str(path))
    train = scan_train_set(cfg, path.parent)
    assert train.classes == tuple(SPECIES) and len(train) == 24 and train.counts() == [8, 8, 8]
    assert all(p.parent == photos["folder"] / "photos" for p in train.paths)
    val = scan_val_set(cfg, path.parent, train.classes)
    assert len(val) == 6 and not set(val.paths) & set(train.paths)
    assert train.labels[train.paths.index(photos["folder"] / photos["train"][1][0])] == 0  # daisy
    assert "split=val rows validate (given)" in describe_roles(cfg, path.parent)


def test_csv_without_split_column_trains_on_every_row(photos):
    path = write_csv(photos["folder"] / "plain.csv", photos["train"], header=("path", "label"))
    cfg = data_cfg(manifest=str(path))
    assert len(scan_train_set(cfg, path.parent)) == 30
    assert scan_val_set(cfg, path.parent, SPECIES) is None  # carved by the stratified split
    assert "stratified split" in describe_roles(cfg, path.parent)


def test_a_rewritten_manifest_is_read_again(photos):
    """Parsed manifests are kept by content: the same size and a new label is a new manifest."""
    path = write_csv(photos["folder"] / "rewritten.csv", photos["train"][:2], header=("path", "label"))
    assert [r.label for r in read_manifest(path)] == ["daisy", "daisy"]
    write_csv(path, [(photos["train"][0][0], "lotus"), photos["train"][1]], header=("path", "label"))
    assert [r.label for r in read_manifest(path)] == ["lotus", "daisy"]


def test_label_level_switches_the_classes(photos):
    path = write_json(photos["folder"] / "train.json", photos["train"])
    by_name = scan_train_set(data_cfg(manifest=str(path)), path.parent)
    by_genus = scan_train_set(data_cfg(manifest=str(path), label_level="genus"), path.parent)
    assert by_name.classes == tuple(SPECIES) and by_name.counts() == [10, 10, 10]
    assert by_genus.classes == ("Bellis", "Rosa") and by_genus.counts() == [10, 20]
    assert set(by_name.paths) == set(by_genus.paths)


def test_test_rows_are_read_only_behind_the_guard(photos):
    path = write_csv(photos["folder"] / "guarded.csv", with_splits(photos))
    cfg = data_cfg(manifest=str(path))
    with pytest.raises(InatError, match="may only be read by test mode"):
        scan_test_set(cfg, path.parent, SPECIES)
    with test_access("test"):
        test = scan_test_set(cfg, path.parent, SPECIES)
    assert len(test) == 9 and test.counts() == [3, 3, 3]
    check_test_set(cfg)  # before training: names and paths only, nothing refused


# --------------------------------------------------------------------------- refusals, one sentence each


def bad_csv(photos, case: str) -> dict:
    """A CSV beside the photos, broken as ``case`` says."""
    tmp, rows = photos["folder"], with_splits(photos)
    if case == "missing file":
        return data_cfg(manifest=str(tmp / "absent.csv"))
    if case == "missing column":
        return data_cfg(manifest=str(write_csv(tmp / "m.csv", [r[:2] for r in rows], header=("file", "label"))))
    if case == "missing paths":
        rows = rows + [(f"photos/gone_{i}.png", "rose", "train") for i in range(5)]
    if case == "empty label":
        rows[4] = (rows[4][0], " ", "train")
    if case == "split value":
        rows[2] = (rows[2][0], rows[2][1], "validation")
    if case == "test row is a training row":
        rows.append((rows[1][0], rows[1][1], "test"))
    level = "genus" if case == "label level of a csv" else "name"
    return data_cfg(manifest=str(write_csv(tmp / "m.csv", rows)), label_level=level)


def bad_json(photos, case: str) -> dict:
    """An iNaturalist JSON beside the photos, broken as ``case`` says."""
    tmp, rows = photos["folder"], photos["train"]
    base = json.loads(write_json(tmp / "ok.json", rows).read_text())
    changes = {"missing key": {"annotations": None}, "unknown image": {},
               "unknown category": {}, "no annotation": {"annotations": base["annotations"][:-2]},
               "label level": {}}[case]
    if case == "unknown image":
        changes = {"annotations": base["annotations"] + [{"id": 99, "image_id": 7, "category_id": 0}]}
    if case == "unknown category":
        changes = {"annotations": [dict(base["annotations"][0], category_id=42)] + base["annotations"][1:]}
    path = write_json(tmp / "m.json", rows, **changes)
    if case == "missing key":
        data = json.loads(path.read_text())
        del data["annotations"]
        path.write_text(json.dumps(data))
    return data_cfg(manifest=str(path), label_level="family" if case == "label level" else "name")


REFUSALS = {  # case: (builder, words the sentence must hold)
    "missing file": (bad_csv, ["absent.csv", "does not exist"]),
    "missing column": (bad_csv, ["no column 'path'", "columns found: file, label"]),
    "missing paths": (bad_csv, ["5 path(s)", "do not exist", "'photos/gone_0.png', 'photos/gone_1.png', "
                                "'photos/gone_2.png')"]),
    "empty label": (bad_csv, ["Row 5 (line 6)", "empty label"]),
    "split value": (bad_csv, ["Row 3 (line 4)", "'validation'", "train, val, test"]),
    "test row is a training row": (bad_csv, ["1 test row(s)", "training or validation images"]),
    "label level of a csv": (bad_csv, ["data.label_level=genus", "label column"]),
    "missing key": (bad_json, ["no key 'annotations'"]),
    "unknown image": (bad_json, ["image id 7", "'images' does not have"]),
    "unknown category": (bad_json, ["category id 42"]),
    "no annotation": (bad_json, ["2 image(s) have no annotation"]),
    "label level": (bad_json, ["no label level 'family'", "genus, name, supercategory"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_manifest_is_one_sentence(capsys, photos, case):
    from test_faults import fails_cleanly

    build, needles = REFUSALS[case]
    cfg = build(photos, case)
    fails_cleanly(capsys, lambda: check_test_set(cfg), *needles)


def test_a_test_manifest_and_split_test_rows_are_one_test_set_too_many(photos, tmp_path):
    cfg = data_cfg(manifest=str(write_csv(tmp_path / "m.csv", with_splits(photos))),
                   test_manifest=str(write_csv(tmp_path / "t.csv", photos["test"], header=("path", "label"))))
    with pytest.raises(InatError, match="keep one test set"):
        check_test_set(cfg)


@pytest.mark.parametrize("case", ["missing column", "split value", "test row is a training row"])
def test_the_command_refuses_a_bad_manifest_and_writes_no_run(photos, tmp_path, case):
    cfg = bad_csv(photos, case)
    run = tmp_path / "run"
    result = run_cli([f"data.manifest={cfg['manifest']}", f"hydra.run.dir={run}", "train.epochs=1", *FAST])
    assert result.returncode == 2, result.stderr[-2000:]
    assert_one_error(result.stderr, REFUSALS[case][1][0])
    assert not (run / "checkpoints").exists() and not (run / "summary.json").exists()


# --------------------------------------------------------------------------- real runs


def test_a_csv_run_trains_tests_its_split_test_rows_and_audits(photos, tmp_path):
    manifest = write_csv(photos["folder"] / "run.csv", with_splits(photos))
    run = tmp_path / "run"
    result = run_cli([f"data.manifest={manifest}", f"hydra.run.dir={run}", "train.epochs=2", *FAST])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"data: {manifest}: split=train rows train, split=val rows validate (given), its split=test rows are the " \
           f"test set" in result.stdout + result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["n_train"], summary["n_val"]) == (24, 6)
    split = json.loads((run / "split.json").read_text())
    assert split["validation"] == "given" and split["classes"] == SPECIES
    assert all(row["path"].startswith("photos/") for row in split["train"] + split["val"])
    test = json.loads((run / "test" / "test.json").read_text())
    assert test["n"] == 9 and test["classes"] == SPECIES

    audit = tmp_path / "audit"
    result = run_cli(["+mode=audit", f"data.manifest={manifest}", f"hydra.run.dir={audit}", "data.workers=1"])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((audit / "audit.json").read_text())
    assert {s: report["splits"][s]["files"] for s in report["splits"]} == {"train": 24, "val": 6, "test": 9}
    assert report["splits"]["test"]["folder"] == "run.csv" and report["test_folder"] == "run.csv"
    assert report["exact_duplicates"]["across_splits"] == []

    html = tmp_path / "report.html"
    result = run_cli(["+mode=report", f"report.inputs=[{run}]", f"report.out={html}",
                      f"hydra.run.dir={tmp_path / 'r'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    text = html.read_text()
    assert str(manifest) in text and "nature_12K" not in text  # the run's data is its manifest, not data.root


def test_a_json_run_by_genus_tests_its_test_manifest_behind_the_leak_guard(photos, tmp_path):
    train = write_json(photos["folder"] / "train2021.json", photos["train"])
    test = write_json(photos["folder"] / "val2021.json", photos["test"])
    run = tmp_path / "run"
    result = run_cli([f"data.manifest={train}", f"data.test_manifest={test}", "data.label_level=genus",
                      f"hydra.run.dir={run}", "train.epochs=2", "train.then_test=false", *FAST])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "its training rows train and validate (stratified split)" in result.stdout + result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_train"] + summary["n_val"] == 30 and summary["n_val"] > 0
    ckpt = run / "checkpoints" / "best.pt"

    scored = tmp_path / "scored"
    result = run_cli(["+mode=test", f"ckpt={ckpt}", f"hydra.run.dir={scored}"])
    assert result.returncode == 0, result.stderr[-2000:]
    score = json.loads((scored / "test.json").read_text())
    assert score["n"] == 9 and score["classes"] == ["Bellis", "Rosa"]
    assert sum(map(sum, score["confusion_matrix"][1:])) == 6  # rose and tulip are both Rosa

    # explain reads the same test rows through the guard; predict names the manifest's classes
    from inat.explain import explain_checkpoint
    from inat.modes.predict import run as predict_mode
    from test_predict import predict_cfg, read_jsonl

    explained = explain_checkpoint(ckpt, tmp_path / "explain", what=["confusion"])
    assert explained["n"] == 9 and explained["classes"] == ["Bellis", "Rosa"]
    predict_mode(predict_cfg(ckpt, [photos["folder"] / photos["test"][0][0]], top_k=2), tmp_path / "predicted")
    [record] = read_jsonl(tmp_path / "predicted" / "predictions.jsonl")
    assert {t["class"] for t in record["top_k"]} == {"Bellis", "Rosa"}

    # A test photo that is a training photo under another name: the bytes give it away.
    copy = photos["folder"] / "photos" / "copy_of_a_training_photo.png"
    shutil.copy(photos["folder"] / photos["train"][0][0], copy)
    leaky = write_csv(tmp_path / "leaky.csv", [(str(copy), "Bellis")], header=("path", "label"))
    refused = tmp_path / "refused"
    result = run_cli(["+mode=test", f"ckpt={ckpt}", f"data.test_manifest={leaky}", f"hydra.run.dir={refused}"])
    copy.unlink()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "byte-identical" in result.stderr and not (refused / "test.json").exists()


def test_resume_after_the_manifest_moved_a_row_is_refused(capsys, photos, tmp_path):
    """The split check compares image hashes, whatever listed them: a row moved to val is a new split."""
    from inat.training import fit
    from test_engine import compose
    from test_faults import fails_cleanly

    rows = with_splits(photos)[:30]  # training and validation rows only: no test set needed
    manifest = write_csv(photos["folder"] / "resume.csv", rows)
    run_dir = tmp_path / "run"

    def train(*extra):
        return fit(compose([f"data.manifest={manifest}", *FAST, "train.epochs=1", "train.then_test=false", *extra]),
                   run_dir)

    train()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    rows[1] = (rows[1][0], rows[1][1], "val")
    write_csv(manifest, rows)
    fails_cleanly(capsys, lambda: train("resume=true"), "resume=true", "changed since", "1 moved")


def test_a_sweep_checks_the_manifest_before_its_study_exists(capsys, photos):
    from inat.sweep.sweeper import check_dataset

    cfg = bad_csv(photos, "split value")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        check_dataset(cfg)
    assert exc.value.code == 2
    assert_one_error(capsys.readouterr().err, "Row 3 (line 4)", "train, val, test")
