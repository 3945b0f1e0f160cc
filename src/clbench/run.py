"""``python -m clbench.run [overrides]``: one experiment, or a sweep with ``--multirun``.

Configuration errors and bad data exit with code 2 and one line naming the key or file, before any model
is loaded or any result written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from clbench.errors import ConfigError, DataError
from clbench.models import asset_path

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

if not OmegaConf.has_resolver("clbench.asset"):
    OmegaConf.register_new_resolver("clbench.asset", asset_path)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from clbench.runner import run_experiment

    try:
        run_experiment(cfg)
    except (ConfigError, DataError) as err:
        print(f"clbench: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
