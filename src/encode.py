"""Encode a data set once into a latent cache: ``python src/encode.py autoencoder_ckpt=PATH data=fashion_mnist``."""

import hydra
from omegaconf import DictConfig

from difflab.utils.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="encode")
def main(cfg: DictConfig) -> None:
    from difflab.tasks.encode import encode  # here, not at the top: `--help` needs no torch nor Lightning

    encode(cfg)


if __name__ == "__main__":
    main()
