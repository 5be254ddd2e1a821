"""Serving runtime: load an exported artifact and triage messages. Imports only onnxruntime, tokenizers,
numpy and the project's torch-free modules, so a serving system needs ``pip install kefu-triage`` only.

    model = TriageModel.load("artifacts/default", precision="int8")
    model.predict(["快递三天没动了，急用！"])
    # [{"intent": "logistics", "intent_prob": ..., "top_intents": [...], "urgent_prob": ...,
    #   "refund_recoverable_prob": None, "route": "human", "reason": "urgent"}]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kefu_triage.core.artifact import MANIFEST, MODEL_FILES, ArtifactError, read_manifest
from kefu_triage.core.heads import OUTPUT_NAMES, probabilities
from kefu_triage.core.inputs import InputError, build_input
from kefu_triage.core.policy import Thresholds, TriagePolicy
from kefu_triage.core.taxonomy import Taxonomy


class TriageModel:
    """A loaded artifact. ``predict`` and ``score`` are safe to call from several threads at once."""

    def __init__(self, artifact_dir: Path, manifest: dict[str, Any], session, tokenizer, batch_size: int = 32):
        self.artifact_dir, self.manifest, self.session, self.tokenizer = artifact_dir, manifest, session, tokenizer
        self.batch_size = batch_size
        self.taxonomy = Taxonomy.from_dict(manifest["taxonomy"], source=str(artifact_dir / MANIFEST))
        self.intent_names = self.taxonomy.intent_names
        self.context_turns = int(manifest["input"]["context_turns"])
        self.max_length = int(manifest["input"]["max_length"])
        self.pad_id = int(manifest["input"]["pad_token_id"])
        self.input_names = list(manifest["input"]["names"])
        self.temperatures = {k: float(v) for k, v in manifest["calibration"]["temperatures"].items()}
        self.thresholds = Thresholds.from_mapping(manifest["policy"]["thresholds"], source=f"{MANIFEST}: policy.thresholds")
        self.policy = TriagePolicy(self.taxonomy.routes, self.thresholds)
        self._refund = np.array([r == "refund_triage" for r in self.taxonomy.routes])

    @classmethod
    def load(cls, path: str | Path, precision: str = "int8", threads: int | None = None, batch_size: int = 32,
             expected_intents: Sequence[str] | None = None, verify_hashes: bool = True) -> TriageModel:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if precision not in MODEL_FILES:
            raise ValueError(f"precision must be one of {list(MODEL_FILES)}, got {precision!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        artifact_dir = Path(path)
        manifest = read_manifest(artifact_dir, verify_hashes)
        if expected_intents is not None and list(expected_intents) != [i["name"] for i in manifest["taxonomy"]["intents"]]:
            raise ArtifactError(f"{artifact_dir / MANIFEST}: the artifact's taxonomy intents differ from the expected ones")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(artifact_dir / MODEL_FILES[precision]), opts, providers=["CPUExecutionProvider"])
            tokenizer = Tokenizer.from_file(str(artifact_dir / "tokenizer.json"))
        except Exception as exc:  # onnxruntime / tokenizers raise their own types for a damaged file
            raise ArtifactError(f"{artifact_dir}: cannot load the {precision} model or tokenizer: {exc}") from None
        tokenizer.no_padding()
        tokenizer.enable_truncation(int(manifest["input"]["max_length"]), strategy="longest_first")
        return cls(artifact_dir, manifest, session, tokenizer, batch_size)

    # ---- inputs ------------------------------------------------------------------------------------
    def _inputs(self, texts: Any, contexts: Any) -> list[tuple[str, str | None]]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
        if contexts is not None and (not isinstance(contexts, (list, tuple)) or len(contexts) != len(texts)):
            raise ValueError("contexts must be None or a list with one entry (a list of turns, or None) per text")
        pairs = []
        for i, text in enumerate(texts):
            try:
                pairs.append(build_input(text, contexts[i] if contexts is not None else None, self.context_turns))
            except InputError as exc:
                raise ValueError(f"texts[{i}]: {exc}") from None
        return pairs

    def _run(self, encodings: list) -> dict[str, np.ndarray]:
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = e.ids, 1, e.type_ids
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        outs = self.session.run(list(OUTPUT_NAMES), {k: feed[k] for k in self.input_names})
        return dict(zip(OUTPUT_NAMES, outs, strict=True))

    def _length_groups(self, lengths: list[int]) -> list[tuple[int, int]]:
        """Split token lengths sorted ascending into [start, end) batches of at most ``batch_size`` whose
        longest member is at most twice (+8 tokens) the shortest: a mixed batch of short messages and long
        messages with context would otherwise pad everything to the longest."""
        groups, start = [], 0
        for i, n in enumerate(lengths):
            if i > start and (i - start >= self.batch_size or n > 2 * lengths[start] + 8):
                groups.append((start, i))
                start = i
        return groups + [(start, len(lengths))] if lengths else groups

    def score(self, texts: Any, contexts: Any = None) -> dict[str, np.ndarray]:
        """Raw logits of the three heads, in input order (batched by similar length to limit padding)."""
        pairs = self._inputs(texts, contexts)
        if not pairs:
            return {"intent_logits": np.zeros((0, len(self.intent_names)), np.float32),
                    "urgent_logit": np.zeros(0, np.float32), "refund_recoverable_logit": np.zeros(0, np.float32)}
        encodings = self.tokenizer.encode_batch([p if p[1] is not None else p[0] for p in pairs])
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        lengths = [len(encodings[i].ids) for i in order]
        parts = [self._run([encodings[i] for i in order[s:e]]) for s, e in self._length_groups(lengths)]
        inverse = np.argsort(np.asarray(order))
        return {k: np.concatenate([p[k] for p in parts])[inverse] for k in OUTPUT_NAMES}

    def predict(self, texts: Any, contexts: Any = None) -> list[dict[str, Any]]:
        """One dict per text: intent, intent_prob, top_intents, urgent_prob, refund_recoverable_prob, route, reason."""
        logits = self.score(texts, contexts)
        p = probabilities(logits, self.temperatures)
        d = self.policy.decide(p["intent"], p["urgent"], p["refund_recoverable"])
        results = []
        for i in range(len(d.route)):
            top = np.argsort(-p["intent"][i])[:3]
            k = int(d.intent_id[i])
            results.append({
                "intent": self.intent_names[k],
                "intent_prob": round(float(p["intent"][i, k]), 6),
                "top_intents": [{"intent": self.intent_names[j], "prob": round(float(p["intent"][i, j]), 6)} for j in top],
                "urgent_prob": round(float(p["urgent"][i]), 6),
                "refund_recoverable_prob": round(float(p["refund_recoverable"][i]), 6) if self._refund[k] else None,
                "route": str(d.route[i]),
                "reason": str(d.reason[i]),
            })
        return results
