"""Write a data set as shards for ``data=streaming``: ``python src/stream.py data=fashion_mnist data.image_size=16
out_dir=DIR`` (then ``python src/train.py data=streaming data.input_dir=DIR data.image_size=16``)."""

import hydra
from omegaconf import DictConfig

from difflab.utils.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="stream")
def main(cfg: DictConfig) -> None:
    from difflab.tasks.stream import stream  # here, not at the top: `--help` needs no torch nor litdata

    stream(cfg)


if __name__ == "__main__":
    main()
