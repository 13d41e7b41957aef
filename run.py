"""inat entry point: compose conf/ with Hydra and hand the config to inat.run."""
import hydra
from omegaconf import DictConfig

import inat
from inat.cli import prepare_argv
from inat.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return inat.run(cfg)


if __name__ == "__main__":
    prepare_argv()
    main()
