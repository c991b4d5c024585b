"""Sample from a checkpoint: ``python src/sample.py ckpt=PATH num_samples=64 [sampler=ddpm sampler.steps=250]``."""

import hydra
from omegaconf import DictConfig

from difflab.utils.config import register_resolvers
from difflab.utils.run_dir import removable_run_dir, remove_if_unused_on_error

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from difflab.tasks.sample import sample  # here, not at the top: `--help` needs no torch nor Lightning

    with remove_if_unused_on_error(removable_run_dir()):
        sample(cfg)


if __name__ == "__main__":
    main()
