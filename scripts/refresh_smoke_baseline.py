"""Refresh tests/baselines/smoke_metrics.json on purpose (after a change that is meant to move the smoke
figures): runs the same smoke pipeline as the test suite and writes its metrics.json as the new baseline.

    .venv/bin/python scripts/refresh_smoke_baseline.py
"""

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import run_smoke_pipeline  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = run_smoke_pipeline(Path(tmp))
        target = ROOT / "tests" / "baselines" / "smoke_metrics.json"
        shutil.copyfile(result["reports"] / "metrics.json", target)
    print(f"wrote {target}; review `git diff {target.relative_to(ROOT)}` before committing")


if __name__ == "__main__":
    main()
