"""The one guarded way to read a checkpoint's test set: test mode, explain and report use it.

Listing, decoding and the leakage check are one function, so no path can score the test
folder without the check: a test folder that is ``train/`` (or a symlink to it), or any
test image byte-identical to an image the run trained or validated on, is refused before
a single score is computed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from inat.data.cache import ImageCache, load_or_build
from inat.data.dataset import scan_test_set
from inat.data.folder import FolderSplit, check_not_train, test_access  # noqa: F401 - check_not_train re-exported
from inat.errors import InatError


def _split_hashes(state: Dict[str, Any]) -> set:
    """The sha1 of every image the run trained or validated on; refused when the checkpoint has none."""
    seen = set(state.get("split_sha1", {}).get("train", [])) | set(state.get("split_sha1", {}).get("val", []))
    if not seen:
        raise InatError("The checkpoint has no split hashes, so test leakage cannot be checked; retrain with this inat.")
    return seen


def check_leakage(test_sha1: Sequence[str], test_paths: Sequence[Path], state: Dict[str, Any], root: Path) -> None:
    """Refuse when a test image's bytes equal a training or validation image's bytes."""
    seen = _split_hashes(state)
    leaks = [p for p, h in zip(test_paths, test_sha1) if h in seen]
    if leaks:
        first = Path(leaks[0]).relative_to(root) if Path(leaks[0]).is_relative_to(root) else leaks[0]
        raise InatError(f"{len(leaks)} test image(s) are byte-identical to images the run trained or validated on "
                        f"(first: {first}); the test score would be inflated, so it was not computed.")


def read_test_set(state: Dict[str, Any], root: str | Path, size: int, *, purpose: str, interpolation: str = "bilinear",
                  crop_pct: float = 1.0, cache_dir: str = "", progress: bool = True,
                  test_manifest: str | None = None) -> Tuple[FolderSplit, ImageCache]:
    """List and decode the test set of checkpoint ``state`` behind the leak guard: the test folder
    of ``root``, or the test rows of the run's manifest (``test_manifest`` replaces the run's).

    ``purpose`` names the caller in the test-folder guard ("test mode", "explain").
    Returns the listing and the decoded (N, size, size, 3) uint8 cache.
    """
    root = Path(root)
    classes = list(state["classes"])
    _split_hashes(state)  # before decoding anything: without hashes nothing may be scored
    data_cfg = {**state.get("config", {}).get("data", {}), "root": str(root)}
    if test_manifest:
        data_cfg["test_manifest"] = str(test_manifest)
    with test_access(purpose):
        folder = scan_test_set(data_cfg, root, classes)
        if len(folder) == 0:
            raise InatError(f"The test set of '{root}' has no images.")
        cache = load_or_build(folder.paths, size, interpolation=interpolation, crop_pct=crop_pct,
                              directory=cache_dir, label="test/", progress=progress)
    check_leakage(cache.sha1, list(folder.paths), state, root)
    return folder, cache
