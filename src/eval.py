"""Evaluate a checkpoint: ``python src/eval.py ckpt=PATH metrics=[fid,is,kid,nll] num_samples=10000``."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from difflab.tasks.eval import evaluate
from difflab.utils.config import register_resolvers
from difflab.utils.run_dir import remove_if_unused_on_error

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with remove_if_unused_on_error(HydraConfig.get().runtime.output_dir):
        evaluate(cfg)


if __name__ == "__main__":
    main()
