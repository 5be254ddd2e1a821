"""`make train` / `python -m kefu_triage.train experiment=default|smoke [overrides]` (Hydra entry point)."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kefu_triage.train.loop import TrainingInterrupted, ensure_data, train


@hydra.main(version_base="1.3", config_path="../../../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise
    ensure_data(cfg)
    try:
        summary = train(cfg, HydraConfig.get().runtime.output_dir)
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(130)
    return summary["best_dev"]["dev_score"]  # for Hydra sweepers


if __name__ == "__main__":
    main()
