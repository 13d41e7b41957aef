"""Config composition: the card's commands, unknown keys, wrong types, booleans, shorthand."""
from __future__ import annotations

from inat.cli import check_overrides, rewrite_shorthand
from conftest import run_cli


def test_card_command_composes_with_mish_and_doubling():
    r = run_cli(["model=scratch", "act=mish", "filters=doubling", "--cfg", "job"])
    assert r.returncode == 0, r.stderr
    assert "name: mish" in r.stdout and "organisation: doubling" in r.stdout


def test_unknown_key_names_nearest_valid_key():
    r = run_cli(["train.epoch=3"])
    assert r.returncode != 0
    assert "train.epoch" in r.stderr and "did you mean 'train.epochs'" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_top_level_key_is_refused():
    assert "did you mean 'seed'" in check_overrides(["sed=1"])


def test_wrong_type_names_the_key():
    r = run_cli(["train.epochs=abc", "--cfg", "job"])
    assert r.returncode != 0
    assert "epochs" in r.stderr


def test_booleans_parse_as_booleans():
    r = run_cli(["model.batch_norm=false", "--cfg", "job"])
    assert r.returncode == 0
    assert "batch_norm: false" in r.stdout


def test_finetune_shorthand_rewrite():
    assert rewrite_shorthand(["finetune=partial_k=3", "seed=1"]) == ["finetune=partial", "finetune.k=3", "seed=1"]
    assert rewrite_shorthand(["model=resnet50"]) == ["model=resnet50"]


def test_unknown_group_choice_lists_options():
    r = run_cli(["act=mish2", "--cfg", "job"])
    assert r.returncode != 0 and "mish" in r.stderr
