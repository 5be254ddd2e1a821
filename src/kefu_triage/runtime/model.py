"""Serving runtime: load an exported artifact and triage messages. Imports only onnxruntime, tokenizers,
numpy and the project's torch-free modules, so a serving system needs ``pip install kefu-triage`` only.

    model = TriageModel.load("artifacts/default", precision="int8")
    model.predict(["快递三天没动了，急用！"])
    # [{"intent": "logistics", "intent_prob": ..., "top_intents": [...], "urgent_prob": ...,
    #   "refund_recoverable_prob": None, "route": "human", "reason": "urgent"}]
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kefu_triage.core.artifact import MANIFEST, MODEL_FILES, ArtifactError, read_manifest
from kefu_triage.core.heads import OUTPUT_NAMES, POOLED_OUTPUT, probabilities
from kefu_triage.core.inputs import InputError, configure_tokenizer, encode_inputs, pad_encodings
from kefu_triage.core.novelty import NoveltyError, NoveltyModel
from kefu_triage.core.policy import Thresholds, TriagePolicy
from kefu_triage.core.taxonomy import Taxonomy

# Session-level fusions left out: SkipLayerNormalization (residual Add + LayerNorm in one op) is slower than
# the unfused ops at message shapes in onnxruntime 1.32 (export.build.optimize does not fuse it either).
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def inference_session(path: str | Path, threads: int | None = None, allow_spinning: bool = True):
    """A CPU onnxruntime session as the runtime runs every model: ``threads`` intra-op threads (None: all
    cores), no inter-op parallelism, the fusions in DISABLED_OPTIMIZERS off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not allow_spinning:  # a server's event loop needs the cores that idle worker threads would spin on
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(path),
        opts,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )


class TriageModel:
    """A loaded artifact. ``predict`` and ``score`` are safe to call from several threads at once."""

    def __init__(
        self,
        artifact_dir: Path,
        manifest: dict[str, Any],
        session,
        tokenizer,
        batch_size: int = 32,
        workers: int = 1,
    ):
        self.artifact_dir, self.manifest, self.session, self.tokenizer = (
            artifact_dir,
            manifest,
            session,
            tokenizer,
        )
        self.batch_size = batch_size
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.taxonomy = Taxonomy.from_dict(manifest["taxonomy"], source=str(artifact_dir / MANIFEST))
        self.intent_names = self.taxonomy.intent_names
        self.context_turns = int(manifest["input"]["context_turns"])
        self.max_length = int(manifest["input"]["max_length"])
        self.pad_id = int(manifest["input"]["pad_token_id"])
        self.input_names = list(manifest["input"]["names"])
        self.temperatures = {k: float(v) for k, v in manifest["calibration"]["temperatures"].items()}
        self.thresholds = Thresholds.from_mapping(
            manifest["policy"]["thresholds"], source=f"{MANIFEST}: policy.thresholds"
        )
        self.policy = TriagePolicy(self.taxonomy.routes, self.thresholds)
        self._refund = np.array([r == "refund_triage" for r in self.taxonomy.routes])
        # novelty: the graph's pooled state + the artifact's statistics (both absent in older artifacts)
        graph_outputs = {o.name for o in session.get_outputs()} if hasattr(session, "get_outputs") else set()
        self.output_names = list(OUTPUT_NAMES) + ([POOLED_OUTPUT] if POOLED_OUTPUT in graph_outputs else [])
        self.novelty: NoveltyModel | None = None
        spec = manifest.get("novelty")
        if spec and POOLED_OUTPUT in self.output_names:
            try:  # read_manifest has checked the file's sha256 against triage.json
                self.novelty = NoveltyModel.load(artifact_dir / str(spec.get("file")))
            except NoveltyError as exc:
                raise ArtifactError(f"{artifact_dir / MANIFEST}: novelty: {exc}") from None

    @classmethod
    def load(
        cls,
        path: str | Path,
        precision: str = "int8",
        threads: int | None = None,
        batch_size: int = 32,
        expected_intents: Sequence[str] | None = None,
        verify_hashes: bool = True,
        batch_independent: bool | None = None,
        allow_spinning: bool = True,
        workers: int = 1,
    ) -> TriageModel:
        """``batch_independent`` (default: True for int8): score one message per onnxruntime call. Dynamic int8
        picks its activation scales per call, so in a batch a message's scores would move with its batch
        mates; alone they are exact and repeatable. fp32 results do not depend on batch mates (to ~1e-6).

        ``workers``: the onnxruntime calls of one ``score``/``predict`` run on this many threads side by
        side, each with ``threads`` intra-op threads (choose workers x threads = cores). One-message int8
        calls are too small to keep two intra-op threads busy: for many messages per call, ``threads=1,
        workers=<cores>`` scores more per second than ``threads=<cores>`` (docs/distillation.md), while
        ``threads=<cores>`` answers a single message sooner. Results are the same either way."""
        from tokenizers import Tokenizer

        if precision not in MODEL_FILES:
            raise ValueError(f"precision must be one of {list(MODEL_FILES)}, got {precision!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        artifact_dir = Path(path)
        manifest = read_manifest(artifact_dir, verify_hashes)
        if expected_intents is not None and list(expected_intents) != [
            i["name"] for i in manifest["taxonomy"]["intents"]
        ]:
            raise ArtifactError(
                f"{artifact_dir / MANIFEST}: the artifact's taxonomy intents differ from the expected ones"
            )
        try:
            session = inference_session(artifact_dir / MODEL_FILES[precision], threads, allow_spinning)
            tokenizer = Tokenizer.from_file(str(artifact_dir / "tokenizer.json"))
        except Exception as exc:  # onnxruntime / tokenizers raise their own types for a damaged file
            raise ArtifactError(
                f"{artifact_dir}: cannot load the {precision} model or tokenizer: {exc}"
            ) from None
        configure_tokenizer(tokenizer, int(manifest["input"]["max_length"]))
        if batch_independent is None:
            batch_independent = precision == "int8"
        return cls(
            artifact_dir, manifest, session, tokenizer, 1 if batch_independent else batch_size, workers
        )

    # ---- inputs ------------------------------------------------------------------------------------
    def _encode(self, texts: Any, contexts: Any) -> list:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
        if contexts is not None and (not isinstance(contexts, (list, tuple)) or len(contexts) != len(texts)):
            raise ValueError(
                "contexts must be None or a list with one entry (a list of turns, or None) per text"
            )
        try:
            return encode_inputs(self.tokenizer, texts, contexts, self.context_turns)
        except InputError as exc:
            raise ValueError(str(exc)) from None

    def _run(self, encodings: list) -> dict[str, np.ndarray]:
        feed = pad_encodings(encodings, self.pad_id, self.input_names)
        outs = self.session.run(self.output_names, feed)
        return dict(zip(self.output_names, outs, strict=True))

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

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:  # score may be called from several threads at once
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kefu-triage-onnx")
            return self._pool

    def score(self, texts: Any, contexts: Any = None) -> dict[str, np.ndarray]:
        """Raw logits of the three heads (and the pooled state under ``"pooled"`` when the graph has it), in input
        order (batched by similar length to limit padding)."""
        encodings = self._encode(texts, contexts)
        if not encodings:
            empty = {
                "intent_logits": np.zeros((0, len(self.intent_names)), np.float32),
                "urgent_logit": np.zeros(0, np.float32),
                "refund_recoverable_logit": np.zeros(0, np.float32),
            }
            if POOLED_OUTPUT in self.output_names:
                empty[POOLED_OUTPUT] = np.zeros(
                    (0, int(self.manifest.get("encoder", {}).get("hidden_size", 0))), np.float32
                )
            return empty
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        lengths = [len(encodings[i].ids) for i in order]
        batches = [[encodings[i] for i in order[s:e]] for s, e in self._length_groups(lengths)]
        if self.workers > 1 and len(batches) > 1:  # onnxruntime releases the GIL while it runs
            # one share per worker, dealt round-robin (batches are sorted by length): a task per tiny int8
            # call would cost more to hand out than the call itself
            n = min(self.workers, len(batches))
            done = list(self._executor().map(lambda w: [self._run(b) for b in batches[w::n]], range(n)))
            parts = [done[i % n][i // n] for i in range(len(batches))]
        else:
            parts = [self._run(batch) for batch in batches]
        inverse = np.argsort(np.asarray(order))
        return {k: np.concatenate([p[k] for p in parts])[inverse] for k in self.output_names}

    def novelty_scores(self, scores: dict[str, np.ndarray]) -> np.ndarray | None:
        """Novelty in [0, 1] of :meth:`score`'s output (None when the artifact has no novelty statistics)."""
        if self.novelty is None or POOLED_OUTPUT not in scores:
            return None
        return self.novelty.score(scores[POOLED_OUTPUT]) if len(scores[POOLED_OUTPUT]) else np.zeros(0)

    def predict(self, texts: Any, contexts: Any = None) -> list[dict[str, Any]]:
        """One dict per text: intent, intent_prob, margin, top_intents, urgent_prob, refund_recoverable_prob,
        novelty (null without novelty statistics), route, reason: the scores the policy compared with its
        thresholds, and what it decided."""
        logits = self.score(texts, contexts)
        p = probabilities(logits, self.temperatures)
        novelty = self.novelty_scores(logits)
        d = self.policy.decide(p["intent"], p["urgent"], p["refund_recoverable"], novelty)
        results = []
        for i in range(len(d.route)):
            top = np.argsort(-p["intent"][i])[:3]
            k = int(d.intent_id[i])
            results.append(
                {
                    "intent": self.intent_names[k],
                    "intent_prob": round(float(p["intent"][i, k]), 6),
                    "margin": round(float(d.margin[i]), 6),
                    "top_intents": [
                        {"intent": self.intent_names[j], "prob": round(float(p["intent"][i, j]), 6)}
                        for j in top
                    ],
                    "urgent_prob": round(float(p["urgent"][i]), 6),
                    "refund_recoverable_prob": round(float(p["refund_recoverable"][i]), 6)
                    if self._refund[k]
                    else None,
                    "novelty": round(float(novelty[i]), 6) if novelty is not None else None,
                    "route": str(d.route[i]),
                    "reason": str(d.reason[i]),
                }
            )
        return results
