"""`make eval` / `python -m kefu_triage.evaluate model_dir=models/default [overrides]` (Hydra entry point)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from kefu_triage.evaluate.assess import evaluate
from kefu_triage.evaluate.extra_sets import summary_line


@hydra.main(version_base="1.3", config_path="../../../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    metrics = evaluate(cfg)
    m, op = metrics["model"], metrics["operating_point"]
    print(
        f"intent macro-F1 {m['intent']['macro_f1']:.3f} | urgent ROC-AUC {m['urgent']['roc_auc']:.3f} | "
        f"coverage {m['triage']['coverage']:.1%} risk {m['triage']['risk']:.1%} | urgent recall "
        f"{m['triage']['urgent_recall']:.1%} | recoverable capture {m['triage']['recoverable_capture']:.1%} | "
        f"constraints met on dev: {op['constraints_met']}"
    )
    for name, extra in metrics["extra_sets"].items():
        print(summary_line(name, extra))
    print(f"wrote {cfg.output_dir}/report.md, report.html, metrics.json, errors.jsonl")


if __name__ == "__main__":
    main()
