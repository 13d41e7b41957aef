"""The commands are thin entry files: ``inat/modes/<name>.py`` with ``run(cfg, out_dir)``, one per ``conf/mode``."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import inat
from inat.modes import NAMES

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [p for p in (ROOT / "inat").rglob("*.py") if "modes" not in p.relative_to(ROOT / "inat").parts]


def test_every_conf_mode_has_an_entry_file_with_run():
    assert sorted(p.stem for p in (ROOT / "conf" / "mode").glob("*.yaml")) == sorted(NAMES)
    assert sorted(p.stem for p in (ROOT / "inat" / "modes").glob("*.py") if p.stem != "__init__") == sorted(NAMES)
    for name in NAMES:
        module, func = inat.MODES[name].split(":")
        assert module == f"inat.modes.{name}" and callable(getattr(importlib.import_module(module), func))


def test_library_modules_define_no_mode_functions():
    """``train_mode``, ``test_mode``, ... lived in the library beside the work; they are the entry files now."""
    offenders = []
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in {f"{n}_mode" for n in NAMES}:
                offenders.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert offenders == []


def test_only_entry_files_read_the_hydra_command_line():
    """The library takes values as arguments; reading the command's overrides is the entry file's job."""
    allowed = {ROOT / "inat" / "__init__.py", ROOT / "inat" / "runs.py"}  # output folder; "are we in a multirun"
    readers = [str(p.relative_to(ROOT)) for p in LIBRARY if "HydraConfig" in p.read_text() and p not in allowed]
    assert readers == []


def test_the_test_score_module_is_not_named_evaluate():
    """Validation is ``evaluate`` (training.sources); the held-out test score is ``inat.holdout``."""
    assert not (ROOT / "inat" / "evaluate.py").exists()
    importers = [str(p.relative_to(ROOT)) for p in [*LIBRARY, *(ROOT / "tests").glob("*.py")]
                 if "inat.evaluate" in p.read_text() and p.name != "test_modes.py"]
    assert importers == []
    from inat.holdout import test_checkpoint  # noqa: F401


def test_lr_find_repeats_the_commands_own_overrides_only():
    from inat.lr_find import suggested_command

    cmd = suggested_command(3.14e-3, ["+mode=lr_find", "model=lite0", "lr_find.rule=steepest", "train.lr=1",
                                      "finetune=partial", "hydra.run.dir=x"])
    assert cmd == "python run.py model=lite0 finetune=partial train.lr=0.0031"
