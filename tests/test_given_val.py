"""A dataset with train/, val/ and test/ brings its own validation split; train/ + val/ keeps val/ as the test set."""
import json
import shutil
from pathlib import Path

from conftest import FAST, make_dataset, run_cli

from inat.data.folder import find_val_dir, roles


def three_folders(root: Path) -> Path:
    """train/ (16 per class), val/ (5 per class, the validation split) and test/ (4 per class)."""
    make_dataset(root, n_test=5, test_name="val", seed=0)
    other = make_dataset(root.parent / "other", n_test=4, test_name="test", seed=1)
    shutil.move(str(other / "test"), str(root / "test"))
    return root


def train(root: Path, run: Path, *extra: str):
    return run_cli([f"data.root={root}", f"hydra.run.dir={run}", "train.epochs=1", *FAST, *extra])


def test_given_val_is_the_validation_split_and_test_the_test_set(tmp_path):
    root = three_folders(tmp_path / "data")
    assert find_val_dir(root) == root / "val"
    run = tmp_path / "run"
    result = train(root, run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data: train/ trains, val/ validates (given), test/ is the test set" in result.stdout + result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["n_train"], summary["n_val"]) == (48, 15)  # all of train/, all of val/: nothing carved
    split = json.loads((run / "split.json").read_text())
    assert split["validation"] == "given"
    assert all(row["path"].startswith("val/") for row in split["val"]) and len(split["val"]) == 15
    assert all(row["path"].startswith("train/") for row in split["train"])
    assert json.loads((run / "test" / "test.json").read_text())["n"] == 12  # test/, not val/


def test_reference_layout_keeps_val_as_the_test_set(tiny_data, tmp_path):
    assert find_val_dir(tiny_data) is None
    assert roles(tiny_data) == "train/ trains and validates (stratified split), val/ is the test set"
    run = tmp_path / "run"
    result = train(tiny_data, run)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_train"] + summary["n_val"] == 48 and summary["n_val"] > 0  # carved from train/
    assert json.loads((run / "split.json").read_text())["validation"] == "carved"
    assert json.loads((run / "test" / "test.json").read_text())["n"] == 12  # val/ is the test set


def test_a_val_class_train_lacks_is_one_sentence(tmp_path):
    root = three_folders(tmp_path / "data")
    shutil.copytree(root / "val" / "class_0", root / "val" / "class_9")
    run = tmp_path / "run"
    result = train(root, run)
    assert result.returncode == 2
    assert "Validation folder" in result.stderr and "class_9" in result.stderr
    assert not (run / "checkpoints").exists()


def test_audit_lists_the_given_val_split(tmp_path):
    from inat.data.audit import audit_dataset

    report = audit_dataset(three_folders(tmp_path / "data"), workers=1, progress=False)
    assert set(report["splits"]) >= {"train", "val", "test"}
