"""Let ``conf/hydra/sweeper/optuna.yaml`` (the Part A search space) be the ``optuna`` preset.

conf/ is the primary config dir, so Hydra finds our ``hydra/sweeper/optuna.yaml`` before the
plugin's structured preset of the same name. But Hydra 1.3 then "automatically matches" our
file against that same-named ConfigStore node, and refuses outright because the node carries
a defaults list ("'hydra/sweeper/optuna' is validated against ConfigStore schema with the
same name ... no longer supported"). Dropping the plugin's node fixes that: our file is then
the only ``hydra/sweeper/optuna`` and still pulls the typed ``hydra/sweeper/sampler/tpe`` node.
Hydra imports every module under ``hydra_plugins`` (re-running the plugin's config module)
before it asks search-path plugins, so this hook runs after the node was stored.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin

OUR_PRESET = Path(__file__).resolve().parents[2] / "conf" / "hydra" / "sweeper" / "optuna.yaml"


def drop_plugin_preset() -> bool:
    """Remove the plugin's structured ``hydra/sweeper/optuna`` node; True if one was removed."""
    sweepers = ConfigStore.instance().repo.get("hydra", {}).get("sweeper", {})
    return sweepers.pop("optuna.yaml", None) is not None


class InatSweeperSearchPath(SearchPathPlugin):
    """Search-path plugin used only for its hook; it adds no path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Only when our preset exists: another project on this interpreter keeps the plugin's.
        if OUR_PRESET.is_file():
            drop_plugin_preset()
