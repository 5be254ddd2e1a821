"""`make data` / `python -m kefu_triage.data [overrides]`: generate the embedded dataset (Hydra entry point)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from kefu_triage.core.taxonomy import taxonomy_from_config
from kefu_triage.data.embedded import prepare_data, stats_markdown


@hydra.main(version_base="1.3", config_path="../../../configs", config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    stats = prepare_data(cfg)
    print(stats_markdown(stats, taxonomy_from_config(cfg.taxonomy)))
    print(f"wrote {cfg.data.dir}/{{train,dev,test}}.jsonl, stats.md, stats.json")


if __name__ == "__main__":
    main()
