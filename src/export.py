"""Export a checkpoint: ``python src/export.py ckpt=PATH format=diffusers|safetensors|feature_net out=DIR``."""

import hydra
from omegaconf import DictConfig

from difflab.utils.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from difflab.tasks.export import export  # here, not at the top: `--help` needs no torch nor Lightning

    export(cfg)


if __name__ == "__main__":
    main()
