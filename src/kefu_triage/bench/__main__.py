"""`make bench` / `python -m kefu_triage.bench model_dir=... artifact_dir=...` (Hydra entry point)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from kefu_triage.bench.latency import format_table, run_bench
from kefu_triage.core.fileio import atomic_write_json


@hydra.main(version_base="1.3", config_path="../../../configs", config_name="bench")
def main(cfg: DictConfig) -> None:
    results = run_bench(cfg)
    print(format_table(results))
    atomic_write_json(Path(cfg.output_dir) / "bench.json", results)
    print(f"wrote {cfg.output_dir}/bench.json")


if __name__ == "__main__":
    main()
