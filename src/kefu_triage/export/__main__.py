"""`make export` / `python -m kefu_triage.export model_dir=... output_dir=...` (Hydra entry point)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from kefu_triage.export.build import ExportError, export


@hydra.main(version_base="1.3", config_path="../../../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    logging.getLogger().setLevel(logging.WARNING)  # onnxruntime's quantizer logs every tensor at INFO
    try:
        manifest = export(cfg)
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        sys.exit(1)
    sizes = ", ".join(f"{n} {f['bytes'] / 1e6:.1f} MB" for n, f in manifest["files"].items())
    print(f"fused ops: {manifest['fused_ops']}")
    print(f"wrote {cfg.output_dir}: {sizes}")


if __name__ == "__main__":
    main()
