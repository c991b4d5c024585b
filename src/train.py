"""Train a diffusion model: ``python src/train.py [group=option ...] [key=value ...]``."""

import hydra
from omegaconf import DictConfig

from difflab.utils.config import register_resolvers
from difflab.utils.run_dir import removable_run_dir, remove_if_unused_on_error

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from difflab.tasks.train import train  # here, not at the top: `--help` needs no torch nor Lightning

    with remove_if_unused_on_error(removable_run_dir()):
        result = train(cfg)
    metric = cfg.get("optimized_metric")
    return result["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    main()
