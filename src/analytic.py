"""Estimate Analytic-DPM's Γ_n of a checkpoint once: ``python src/analytic.py ckpt=PATH [num_samples=64]``; then
``python src/sample.py ckpt=PATH sampler=ddpm sampler.variance_type=analytic sampler.steps=10``."""

import hydra
from omegaconf import DictConfig

from difflab.utils.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="analytic")
def main(cfg: DictConfig) -> None:
    from difflab.tasks.analytic import analytic  # here, not at the top: `--help` needs no torch nor Lightning

    analytic(cfg)


if __name__ == "__main__":
    main()
