"""Novelty: how unlike the training data a message is, from the encoder's pooled state.

Mahalanobis distance to the nearest training class mean under one shared covariance (Lee et al. 2018),
shrunk towards a scaled identity with the Ledoit-Wolf coefficient (the pooled state has hundreds of
dimensions and a few thousand training rows). The raw distance is mapped to [0, 1] by its empirical CDF
on held-out reference messages (synthetic dev), so a novelty threshold reads as a quantile: 0.95 = "more
unusual than 95% of held-out in-domain messages".

numpy only: the torch-free runtime scores with this module; the statistics travel in the artifact as
``novelty.npz`` (hashed in triage.json like every file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

NOVELTY_FILE = "novelty.npz"
METHOD = "mahalanobis_shared_ledoit_wolf"
_KEYS = ("means", "precision", "reference")


class NoveltyError(ValueError):
    """Novelty statistics that are missing, malformed or do not fit the model's pooled state."""


def ledoit_wolf(centered: np.ndarray) -> tuple[np.ndarray, float]:
    """Shrunk covariance (1-s)·S + s·(tr S / d)·I of already centred rows, with the Ledoit-Wolf s."""
    n, d = centered.shape
    s = centered.T @ centered / n
    mu = np.trace(s) / d
    delta = ((s - mu * np.eye(d)) ** 2).sum() / d
    # sum_i ||x_i x_i^T - S||_F^2 = sum_i ||x_i||^4 - n ||S||_F^2
    beta = ((centered**2).sum(1) ** 2).sum() - n * (s**2).sum()
    beta = min(beta / (n * n * d), delta)
    shrink = float(beta / delta) if delta > 0 else 1.0
    return (1 - shrink) * s + shrink * mu * np.eye(d), shrink


@dataclass(frozen=True)
class NoveltyModel:
    means: np.ndarray  # [K, D] training class means (classes without rows are left out)
    precision: np.ndarray  # [D, D] inverse of the shared shrunk covariance
    reference: np.ndarray  # sorted raw distances of held-out reference messages (the CDF's support)
    shrinkage: float = 0.0

    def __post_init__(self) -> None:
        # Per-message work is then one [D, D] product: recomputing means·precision·means on every call was
        # 17x that, and on a serving path it competed with onnxruntime's threads for the cores.
        means_p = self.means @ self.precision
        object.__setattr__(self, "_means_p", means_p)
        object.__setattr__(self, "_means_norm", (means_p * self.means).sum(1))

    @classmethod
    def fit(
        cls, pooled: np.ndarray, labels: np.ndarray, reference_pooled: np.ndarray, max_reference: int = 2001
    ) -> NoveltyModel:
        """Class means and shared covariance from training rows; the CDF from ``reference_pooled``."""
        x = np.asarray(pooled, dtype=np.float64)
        labels = np.asarray(labels)
        if x.ndim != 2 or len(x) != len(labels) or len(x) < 2:
            raise NoveltyError(
                f"novelty fit needs pooled states [N, D] with one label each, got {list(x.shape)} "
                f"and {len(labels)} labels"
            )
        classes = np.unique(labels)
        means = np.stack([x[labels == c].mean(0) for c in classes])
        centered = x - means[np.searchsorted(classes, labels)]
        cov, shrink = ledoit_wolf(centered)
        model = cls(means=means, precision=np.linalg.inv(cov), reference=np.zeros(1), shrinkage=shrink)
        raw = np.sort(model.distance(reference_pooled))
        if len(raw) > max_reference:  # quantiles are enough for the CDF; keeps the file small
            raw = np.quantile(raw, np.linspace(0, 1, max_reference))
        return cls(means=means, precision=model.precision, reference=raw, shrinkage=shrink)

    def distance(self, pooled: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, [N]."""
        x = np.asarray(pooled, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.means.shape[1]:
            raise NoveltyError(
                f"pooled state must have shape [N, {self.means.shape[1]}], got {list(x.shape)}"
            )
        xp = x @ self.precision
        d = (xp * x).sum(1)[:, None] - 2 * x @ self._means_p.T + self._means_norm[None]
        return np.maximum(d.min(1), 0.0) if len(x) else np.zeros(0)

    def score(self, pooled: np.ndarray) -> np.ndarray:
        """Novelty in [0, 1): the share of reference messages less unusual than each message (interpolated).

        Beyond the most unusual reference message the scale goes on with a tail towards 1
        instead of stopping at 1: real traffic lives out there, and ties would leave a threshold nothing to
        rank by."""
        return self.scale(self.distance(pooled))

    def scale(self, distance: np.ndarray) -> np.ndarray:
        ref, d = self.reference, np.asarray(distance, dtype=np.float64)
        m = len(ref)
        top = 1.0 - 1.0 / (m + 1)
        inside = np.interp(d, ref, np.linspace(0.0, top, m)) if m > 1 else np.where(d > ref[0], top, 0.0)
        # 1 - (1 - top)·d_max/d: continuous at d_max, and slow enough that float64 keeps far points apart
        d_max = max(float(ref[-1]), 1e-12)
        tail = 1.0 - (1.0 - top) * d_max / np.maximum(d, d_max)
        return np.where(d > ref[-1], tail, inside)

    def save(self, path: str | Path) -> Path:
        """Written atomically (the exporter hashes the file afterwards)."""
        import io

        from kefu_triage.core.fileio import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(
            buf,
            means=self.means.astype(np.float32),
            precision=self.precision.astype(np.float32),
            reference=self.reference.astype(np.float64),
            shrinkage=np.array(self.shrinkage),
        )
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> NoveltyModel:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k], dtype=np.float64) for k in _KEYS}
                shrink = float(z["shrinkage"]) if "shrinkage" in z.files else 0.0
        except FileNotFoundError:
            raise NoveltyError(f"{path}: missing") from None
        except KeyError as exc:
            raise NoveltyError(f"{path}: no array {exc} (expected {list(_KEYS)})") from None
        except (OSError, ValueError) as exc:  # not a zip / damaged member
            raise NoveltyError(f"{path}: not a readable .npz file ({exc})") from None
        m, p, r = arrays["means"], arrays["precision"], arrays["reference"]
        if m.ndim != 2 or p.shape != (m.shape[1], m.shape[1]) or r.ndim != 1 or not len(r):
            raise NoveltyError(
                f"{path}: inconsistent shapes means {list(m.shape)}, precision {list(p.shape)}, "
                f"reference {list(r.shape)}"
            )
        if not all(np.isfinite(a).all() for a in (m, p, r)):
            raise NoveltyError(f"{path}: non-finite values")
        return cls(means=m, precision=p, reference=np.sort(r), shrinkage=shrink)
