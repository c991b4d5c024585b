"""Evaluate a checkpoint: ``python src/eval.py ckpt=PATH metrics=[fid,is,kid,nll] num_samples=10000``."""

import hydra
from omegaconf import DictConfig

from difflab.utils.config import register_resolvers
from difflab.utils.run_dir import removable_run_dir, remove_if_unused_on_error

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from difflab.tasks.eval import evaluate  # here, not at the top: `--help` needs no torch nor Lightning

    with remove_if_unused_on_error(removable_run_dir()):
        evaluate(cfg)


if __name__ == "__main__":
    main()
