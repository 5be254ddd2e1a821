"""The labelling loop: pick the unlabelled messages worth labelling, and bring the labels back.

    kefu-triage select --artifact DIR --input unlabeled.jsonl --n 200 --strategy diverse \\
        --format label-studio --output tasks.json        # + tasks.json.label_config.xml
    kefu-triage import-labels --format label-studio export.json --output labelled.jsonl

``select`` scores a pool of messages (JSONL/CSV/Parquet with ``text`` and optional ``context``) with an
exported artifact and writes the chosen ones as Label Studio tasks or doccano JSONL, pre-annotated with the
model's answers. ``import-labels`` turns the tool's export into the project's labelled format (validated
against the taxonomy, every problem named by task id), ready for ``data=custom`` and ``kefu-triage validate``.

Strategies: ``uncertainty`` (smallest margin between the two most likely intents, plus urgent and refund
probabilities near 0.5), ``diverse`` (k-means over message vectors, the most uncertain message of each
cluster), ``novelty`` (farthest from the reference messages the model learnt from), ``random``. Message
vectors come from the artifact's ``embedding`` output when its manifest lists one, else from character
n-gram TF-IDF (scikit-learn, imported only when needed: this is a labelling tool, not the serving runtime).
"""

from __future__ import annotations

import difflib
import json
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from kefu_triage.core.fileio import atomic_write_json, atomic_write_jsonl, atomic_write_text
from kefu_triage.core.heads import probabilities
from kefu_triage.core.inputs import ROLE_PREFIX, clean_text
from kefu_triage.core.taxonomy import Taxonomy, load_taxonomy
from kefu_triage.data.records import (
    LABEL_FIELDS,
    DataValidationError,
    _as_binary,
    _check_context,
    _example_key,
    _iter_jsonl,
    iter_rows,
)

STRATEGIES = ("uncertainty", "diverse", "novelty", "random")
FORMATS = ("label-studio", "doccano")
# Output names an artifact may carry for a message embedding (listed in manifest["output"]["names"]).
EMBEDDING_OUTPUTS = ("pooled", "embedding", "embeddings", "sentence_embedding")
# How much each head's doubt counts in the uncertainty score: the intent decides the route, so it leads.
UNCERTAINTY_WEIGHTS = {"intent": 1.0, "urgent": 0.5, "refund_recoverable": 0.5}
SCORE_CHUNK = 1024  # messages per TriageModel.score call (progress and bounded memory)
META_KEY = "kefu"  # task data key holding what import-labels needs back (structured context, source row)
# Label values in the tools: Label Studio stores the Choice value; doccano has one flat label set per project.
BINARY_VALUES = {"urgent": ("0", "1"), "refund_recoverable": ("0", "1")}
DOCCANO_BINARY = {"urgent": ("not_urgent", "urgent"), "refund_recoverable": ("firm", "recoverable")}
BINARY_TEXT = {
    "urgent": ("不紧急 not urgent", "紧急 urgent"),
    "refund_recoverable": ("坚决退款 firm", "可挽回 recoverable"),
}


class LabellingError(ValueError):
    """Bad arguments or a missing optional dependency for select / import-labels (a clear one-line error)."""


# ---------------------------------------------------------------------------------------------------
# Reading an unlabelled pool (text + optional context; labels, if any, are ignored)
# ---------------------------------------------------------------------------------------------------
def _check_pool_row(row: Any) -> tuple[dict[str, Any] | None, list[str]]:
    if not isinstance(row, dict):
        return None, [f"record: must be a JSON object, got {type(row).__name__}"]
    problems = []
    text = row.get("text")
    if not isinstance(text, str):
        problems.append(
            "text: missing" if text is None else f"text: must be a string, got {type(text).__name__}"
        )
    elif not clean_text(text):
        problems.append("text: empty (or only control / invisible characters)")
    context, ctx_problem = _check_context(row.get("context"))
    if ctx_problem:
        problems.append(f"context: {ctx_problem}")
    if problems:
        return None, problems
    # other columns (an id, a channel, ...) travel with the message into the tool and back
    meta = {k: v for k, v in row.items() if k not in LABEL_FIELDS and v is not None and k != META_KEY}
    return {"text": text, "context": context, "meta": meta}, []


def read_pool(path: str | Path, drop_invalid: bool = False) -> list[dict[str, Any]]:
    """Messages to choose from: ``{"text", "context", "meta", "source": "file:line"}`` per valid row.

    Raises DataValidationError listing every bad row as ``path:line: field: problem``; with ``drop_invalid``
    the bad rows are skipped and reported on stderr.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError([f"{path}: file not found"], str(path))
    records, problems = [], []
    for lineno, row, parse_problem in iter_rows(path, required=("text",)):
        record, issues = (None, [parse_problem]) if parse_problem else _check_pool_row(row)
        if record is None:
            problems += [f"{path}:{lineno}: {p}" for p in issues]
            continue
        record["source"] = f"{path.name}:{lineno}"
        records.append(record)
    if problems and not drop_invalid:
        raise DataValidationError(
            problems, str(path), hint="Fix these rows, or pass --drop-invalid to skip them."
        )
    if problems:
        print(
            f"warning: {path}: skipped {len(problems)} invalid row(s):\n  " + "\n  ".join(problems[:20]),
            file=sys.stderr,
        )
    if not records:
        raise DataValidationError([f"{path}: no usable messages"], str(path))
    return records


def _dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """First occurrence of each (cleaned text, context): labelling the same message twice teaches nothing."""
    seen, out = set(), []
    for r in records:
        key = _example_key(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def read_reference_texts(paths: Sequence[str | Path] | None) -> tuple[list[str], str]:
    """Messages the model learnt from (novelty is distance to these) and a description of where they came from.

    Default: the packaged seed messages the built-in training data is generated from; pass the training
    file(s) of a model trained on your own data.
    """
    if paths:
        texts = []
        for p in paths:
            texts += [r["text"] for r in read_pool(p)]
        return texts, ", ".join(str(p) for p in paths)
    from kefu_triage.data.generator import load_seeds

    return [
        s["text"] for s in load_seeds()
    ], "the packaged seed messages (pass --reference TRAIN_FILE for your own)"


# ---------------------------------------------------------------------------------------------------
# Scoring: calibrated probabilities, uncertainty, message vectors
# ---------------------------------------------------------------------------------------------------
def uncertainty_scores(probs: dict[str, np.ndarray], refund_mask: np.ndarray) -> np.ndarray:
    """Higher = the model is less sure: 1 - (top-1 minus top-2 intent probability), plus how close the urgent
    probability (and, where the predicted intent routes to refund_triage, the refund one) is to 0.5."""
    p = np.asarray(probs["intent"])
    top2 = -np.sort(-p, axis=1)[:, :2]
    score = UNCERTAINTY_WEIGHTS["intent"] * (1.0 - (top2[:, 0] - top2[:, 1]))
    score += UNCERTAINTY_WEIGHTS["urgent"] * (1.0 - np.abs(2.0 * probs["urgent"] - 1.0))
    refund = refund_mask[p.argmax(axis=1)]
    score += (
        UNCERTAINTY_WEIGHTS["refund_recoverable"]
        * refund
        * (1.0 - np.abs(2.0 * probs["refund_recoverable"] - 1.0))
    )
    return score


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=" msg", file=sys.stderr, disable=total < SCORE_CHUNK)
    except ImportError:  # runtime-only installs have no tqdm: no bar then
        return None


def embedding_output(manifest: dict[str, Any]) -> str | None:
    """The artifact's message-embedding output, if its manifest lists one (``output.pooled``, or an embedding
    name among ``output.names``); older artifacts have none."""
    out = manifest.get("output") or {}
    if isinstance(out.get("pooled"), str):
        return out["pooled"]
    return next((n for n in out.get("names") or [] if n in EMBEDDING_OUTPUTS), None)


@dataclass
class PoolScores:
    probs: dict[str, np.ndarray]  # calibrated probabilities of the three heads
    vectors: np.ndarray | None  # the artifact's embedding of each message (L2-normalised), if it has one
    novelty: np.ndarray | None  # the artifact's own novelty in [0, 1] (distance to its training data), if any


def score_pool(model, texts: Sequence[str], contexts: Sequence[Any] | None = None) -> PoolScores:
    """TriageModel.score in chunks: probabilities, plus the embedding and novelty when the artifact has them."""
    emb_name = embedding_output(model.manifest)
    parts = []
    bar = _progress(len(texts), "scoring")
    for start in range(0, len(texts), SCORE_CHUNK):
        chunk_ctx = list(contexts[start : start + SCORE_CHUNK]) if contexts is not None else None
        parts.append(model.score(list(texts[start : start + SCORE_CHUNK]), chunk_ctx))
        if bar is not None:
            bar.update(len(parts[-1]["intent_logits"]))
    if bar is not None:
        bar.close()
    scores = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    vectors = None
    if emb_name and emb_name in scores:
        vectors = np.asarray(scores[emb_name], dtype=np.float64).reshape(len(texts), -1)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    novelty_fn = getattr(model, "novelty_scores", None)
    novelty = novelty_fn(scores) if novelty_fn is not None else None
    return PoolScores(
        probabilities(scores, model.temperatures),
        vectors,
        None if novelty is None else np.asarray(novelty, dtype=np.float64),
    )


def _sklearn(strategy: str):
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise LabellingError(
            f"--strategy {strategy} needs scikit-learn for its message vectors and clustering: "
            "pip install 'kefu-triage[train]' (or pip install scikit-learn)"
        ) from None


def tfidf_vectors(texts: Sequence[str], reference: Sequence[str] = ()):
    """Character 1-3-gram TF-IDF rows (L2-normalised, sparse) for ``texts`` and ``reference``: Chinese has no
    spaces, and character n-grams need no segmenter and no model."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, dtype=np.float32)
    matrix = vec.fit_transform([clean_text(t) for t in list(texts) + list(reference)])
    return matrix[: len(texts)], matrix[len(texts) :]


def _max_similarity(pool, reference) -> np.ndarray:
    """Largest cosine similarity of each pool row to any reference row (both L2-normalised), in chunks."""
    if reference.shape[0] == 0:
        return np.zeros(pool.shape[0])
    best = []
    for s in range(0, pool.shape[0], 2048):
        sims = pool[s : s + 2048] @ reference.T
        sims = sims.toarray() if hasattr(sims, "toarray") else np.asarray(sims)
        best.append(sims.max(axis=1))
    return np.concatenate(best)


def _dense(vectors, seed: int, dims: int = 64) -> np.ndarray:
    """Dense rows for k-means: sparse TF-IDF is reduced with truncated SVD (LSA) first."""
    if not hasattr(vectors, "toarray"):
        return np.asarray(vectors, dtype=np.float64)
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize

    k = min(dims, vectors.shape[1] - 1, vectors.shape[0] - 1)
    if k < 2:
        return vectors.toarray().astype(np.float64)
    return normalize(TruncatedSVD(n_components=k, random_state=seed).fit_transform(vectors))


# ---------------------------------------------------------------------------------------------------
# Strategies: each returns n distinct indices (most useful first), deterministic for a seed
# ---------------------------------------------------------------------------------------------------
def _by_score(score: np.ndarray, tie: np.ndarray | None = None) -> np.ndarray:
    """Indices by descending score; ties by ``tie`` (descending), then by position (stable)."""
    keys = (np.arange(len(score)),) + ((-tie,) if tie is not None else ()) + (-score,)
    return np.lexsort(keys)


def pick_diverse(vectors, uncertainty: np.ndarray, n: int, seed: int) -> np.ndarray:
    """k-means with k = n over the vectors; the most uncertain message of each cluster, most uncertain first."""
    from sklearn.cluster import KMeans

    dense = _dense(vectors, seed)
    k = min(n, len(uncertainty))
    labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(dense)
    order = _by_score(uncertainty)
    chosen, used = [], set()
    for i in order:  # first (most uncertain) member of each cluster
        if labels[i] not in used:
            used.add(labels[i])
            chosen.append(i)
    # identical vectors can leave a cluster empty: fill with the most uncertain messages not chosen yet
    taken = set(chosen)
    chosen += [i for i in order if i not in taken][: n - len(chosen)]
    chosen = np.asarray(chosen[:n])
    return chosen[_by_score(uncertainty[chosen])]


def choose(
    strategy: str,
    n: int,
    uncertainty: np.ndarray,
    seed: int = 0,
    vectors=None,
    novelty: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the n chosen messages (fewer if the pool is smaller), most useful first."""
    n = min(n, len(uncertainty))
    if strategy == "random":
        return np.random.default_rng(seed).permutation(len(uncertainty))[:n]
    if strategy == "uncertainty":
        return _by_score(uncertainty)[:n]
    if strategy == "novelty":
        return _by_score(novelty, tie=uncertainty)[:n]
    if strategy == "diverse":
        return pick_diverse(vectors, uncertainty, n, seed)
    raise LabellingError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


@dataclass
class Selection:
    """The chosen messages with the model's answers, ready to be written for a labelling tool."""

    records: list[dict[str, Any]]
    probs: dict[str, np.ndarray]
    scores: np.ndarray  # the strategy's score of each chosen message (uncertainty, novelty, or 0 for random)
    strategy: str
    taxonomy: Taxonomy
    model_version: str
    pool_size: int
    notes: list[str] = field(default_factory=list)

    def prediction(self, i: int) -> dict[str, Any]:
        """The model's label for chosen message ``i``: intent, urgent (0/1 at 0.5), refund_recoverable or None."""
        k = int(self.probs["intent"][i].argmax())
        intent = self.taxonomy.intent_names[k]
        refund = None
        if self.taxonomy.routes[k] == "refund_triage":
            refund = int(self.probs["refund_recoverable"][i] >= 0.5)
        return {
            "intent": intent,
            "intent_prob": float(self.probs["intent"][i, k]),
            "urgent": int(self.probs["urgent"][i] >= 0.5),
            "refund_recoverable": refund,
        }


def _model_version(model, precision: str) -> str:
    from kefu_triage.core.artifact import MODEL_FILES

    m = model.manifest
    sha = ((m.get("files") or {}).get(MODEL_FILES[precision]) or {}).get("sha256", "")
    return f"kefu-triage-{m.get('kefu_triage_version', '?')}-{m.get('encoder', {}).get('name', '?')}-{precision}-{sha[:12]}"


def select(
    artifact: str | Path,
    input_path: str | Path,
    n: int = 200,
    strategy: str = "uncertainty",
    seed: int = 0,
    reference: Sequence[str | Path] | None = None,
    precision: str = "int8",
    drop_invalid: bool = False,
) -> Selection:
    """Score the pool with the artifact and choose ``n`` distinct messages with ``strategy``.

    ``reference`` files (e.g. the training file) are left out of the pool and are what novelty measures
    distance to (default for novelty: the packaged seed messages).
    """
    from kefu_triage.runtime.model import TriageModel

    if strategy not in STRATEGIES:
        raise LabellingError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not isinstance(n, int) or n < 1:
        raise LabellingError(f"--n must be a positive integer, got {n!r}")
    if strategy == "diverse":
        _sklearn(strategy)  # fail before the (slow) scoring
    notes = []
    pool = read_pool(input_path, drop_invalid)
    unique = _dedupe(pool)
    if len(unique) < len(pool):
        notes.append(f"{len(pool) - len(unique)} repeated message(s) counted once")
    ref_texts, ref_source = read_reference_texts(reference) if reference else ([], "")
    if reference:
        known = {clean_text(t) for t in ref_texts}
        kept = [r for r in unique if clean_text(r["text"]) not in known]
        if len(kept) < len(unique):
            notes.append(f"{len(unique) - len(kept)} message(s) already in the reference data left out")
        unique = kept
    if not unique:
        raise LabellingError(f"{input_path}: no messages left to choose from")
    if len(unique) < n:
        notes.append(f"only {len(unique)} distinct message(s) in the pool: all are selected (asked for {n})")

    model = TriageModel.load(artifact, precision=precision)
    pool_scores = score_pool(model, [r["text"] for r in unique], [r["context"] for r in unique])
    probs = pool_scores.probs
    refund_mask = np.array([r == "refund_triage" for r in model.taxonomy.routes])
    unc = uncertainty_scores(probs, refund_mask)
    vectors = novelty = None
    if strategy == "novelty" and pool_scores.novelty is not None and not reference:
        # the artifact's own measure of distance to the data it was trained on
        notes.append("novelty: the artifact's novelty statistics (distance to its training data)")
        novelty = pool_scores.novelty
    elif strategy in ("diverse", "novelty"):
        _sklearn(strategy)
        if strategy == "novelty" and not reference:
            ref_texts, ref_source = read_reference_texts(None)
        if pool_scores.vectors is not None:
            notes.append(f"message vectors: the artifact's {embedding_output(model.manifest)!r} output")
            vectors = pool_scores.vectors
            ref_vectors = score_pool(model, ref_texts).vectors if strategy == "novelty" else None
        else:
            notes.append("message vectors: character n-gram TF-IDF (the artifact has no embedding output)")
            vectors, ref_vectors = tfidf_vectors(
                [r["text"] for r in unique], ref_texts if strategy == "novelty" else ()
            )
        if strategy == "novelty":
            notes.append(f"novelty reference: {len(ref_texts)} message(s) from {ref_source}")
            novelty = 1.0 - _max_similarity(vectors, ref_vectors)
    idx = choose(strategy, n, unc, seed, vectors, novelty)
    scores = {"uncertainty": unc, "diverse": unc, "novelty": novelty}.get(strategy)
    return Selection(
        records=[unique[i] for i in idx],
        probs={k: v[idx] for k, v in probs.items()},
        scores=scores[idx] if scores is not None else np.zeros(len(idx)),
        strategy=strategy,
        taxonomy=model.taxonomy,
        model_version=_model_version(model, precision),
        pool_size=len(unique),
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------
# Writing tasks for the labelling tools
# ---------------------------------------------------------------------------------------------------
def context_display(context: list[dict[str, str]]) -> str:
    """Previous turns as the annotator reads them, one per line with the role prefix the model sees."""
    return (
        "\n".join(ROLE_PREFIX[t["role"]] + t["text"] for t in context)
        if context
        else "（无上文 no previous turns）"
    )


def _task_meta(sel: Selection, i: int) -> dict[str, Any]:
    r = sel.records[i]
    return {
        "context": r["context"],
        "source": r["source"],
        **({"row": r["meta"]} if r["meta"] else {}),
        "strategy": sel.strategy,
        "rank": i + 1,
        "selection_score": round(float(sel.scores[i]), 6),
    }


def _choice(name: str, value: str) -> dict[str, Any]:
    return {"from_name": name, "to_name": "text", "type": "choices", "value": {"choices": [value]}}


def label_studio_tasks(sel: Selection) -> list[dict[str, Any]]:
    """Label Studio import JSON: one task per message, pre-annotated with the model's prediction."""
    tasks = []
    for i, r in enumerate(sel.records):
        pred = sel.prediction(i)
        result = [
            _choice("intent", pred["intent"]),
            _choice("urgent", BINARY_VALUES["urgent"][pred["urgent"]]),
        ]
        if pred["refund_recoverable"] is not None:
            result.append(
                _choice("refund_recoverable", BINARY_VALUES["refund_recoverable"][pred["refund_recoverable"]])
            )
        tasks.append(
            {
                "data": {
                    "text": r["text"],
                    "context": context_display(r["context"]),
                    META_KEY: _task_meta(sel, i),
                },
                "predictions": [
                    {
                        "model_version": sel.model_version,
                        "score": round(pred["intent_prob"], 6),
                        "result": result,
                    }
                ],
            }
        )
    return tasks


def label_studio_config(taxonomy: Taxonomy) -> str:
    """The labeling config matching ``label_studio_tasks``: the message (and its previous turns) with single
    choices for intent, urgent and, only when a refund_triage intent is chosen, refund_recoverable."""

    def choices(name: str, options: list[tuple[str, str]], extra: str = "") -> list[str]:
        lines = [f'  <Choices name="{name}" toName="text" choice="single-radio" showInline="true"{extra}>']
        lines += [f"    <Choice value={quoteattr(v)} html={quoteattr(h)}/>" for v, h in options]
        return lines + ["  </Choices>"]

    refund = ",".join(taxonomy.refund_intents)
    lines = [
        "<View>",
        '  <Header value="上文 previous turns" size="6"/>',
        '  <Text name="context" value="$context"/>',
        '  <Header value="顾客消息 message to label" size="5"/>',
        '  <Text name="text" value="$text"/>',
        '  <Header value="意图 intent" size="6"/>',
    ]
    lines += choices(
        "intent",
        [(i.name, f"{i.name} {i.zh}".strip()) for i in taxonomy.intents],
        ' required="true" requiredMessage="Choose the intent"',
    )
    lines += ['  <Header value="紧急 urgent" size="6"/>']
    lines += choices(
        "urgent",
        [(v, f"{v} {t}") for v, t in zip(BINARY_VALUES["urgent"], BINARY_TEXT["urgent"], strict=True)],
    )
    if refund:
        lines += [
            f'  <View visibleWhen="choice-selected" whenTagName="intent" whenChoiceValue={quoteattr(refund)}>',
            '    <Header value="可挽回 refund_recoverable" size="6"/>',
        ]
        lines += [
            "  " + s
            for s in choices(
                "refund_recoverable",
                [
                    (v, f"{v} {t}")
                    for v, t in zip(
                        BINARY_VALUES["refund_recoverable"], BINARY_TEXT["refund_recoverable"], strict=True
                    )
                ],
            )
        ]
        lines += ["  </View>"]
    return "\n".join(lines + ["</View>"]) + "\n"


def doccano_labels(taxonomy: Taxonomy) -> list[str]:
    """The project's flat label set: the intents, then urgent / not_urgent and recoverable / firm."""
    return taxonomy.intent_names + [
        v for head in ("urgent", "refund_recoverable") for v in DOCCANO_BINARY[head]
    ]


def doccano_rows(sel: Selection) -> list[dict[str, Any]]:
    """doccano text-classification import JSONL (text + label list); other keys become doccano metadata and
    come back in its export. No top-level "id": doccano's export would let it shadow its own example id."""
    rows = []
    for i, r in enumerate(sel.records):
        pred = sel.prediction(i)
        labels = [pred["intent"], DOCCANO_BINARY["urgent"][pred["urgent"]]]
        if pred["refund_recoverable"] is not None:
            labels.append(DOCCANO_BINARY["refund_recoverable"][pred["refund_recoverable"]])
        rows.append(
            {
                "text": r["text"],
                "label": labels,
                "context": context_display(r["context"]),
                META_KEY: _task_meta(sel, i),
            }
        )
    return rows


def write_selection(sel: Selection, fmt: str, output: str | Path) -> list[Path]:
    """Write the tasks (atomically) plus the tool's label definition next to them; returns the files."""
    output = Path(output)
    if fmt == "label-studio":
        config = output.with_name(output.name + ".label_config.xml")
        atomic_write_json(output, label_studio_tasks(sel))
        atomic_write_text(config, label_studio_config(sel.taxonomy))
        return [output, config]
    if fmt == "doccano":
        labels = output.with_name(output.name + ".labels.json")
        atomic_write_jsonl(output, doccano_rows(sel))
        atomic_write_json(
            labels,
            [
                {"text": t, "suffix_key": None, "background_color": c, "text_color": "#ffffff"}
                for t, c in zip(doccano_labels(sel.taxonomy), _colours(), strict=False)
            ],
        )
        return [output, labels]
    raise LabellingError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _colours() -> Iterator[str]:
    palette = (
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    )
    i = 0
    while True:
        yield palette[i % len(palette)]
        i += 1


# ---------------------------------------------------------------------------------------------------
# Importing a tool's export back into the project's format
# ---------------------------------------------------------------------------------------------------
_BINARY_WORDS = {
    "urgent": {"urgent": 1, "not_urgent": 0},
    "refund_recoverable": {"recoverable": 1, "firm": 0},
}


def _binary_label(head: str, value: Any) -> int | str:
    """0/1 from "0"/"1", true/false, or the head's words (urgent / not_urgent, recoverable / firm); else a problem."""
    if isinstance(value, str) and value.strip().lower() in _BINARY_WORDS[head]:
        return _BINARY_WORDS[head][value.strip().lower()]
    parsed = _as_binary(value)
    if parsed is None or isinstance(parsed, str):
        words = "/".join(_BINARY_WORDS[head])
        return f"{head}: unknown label {value!r}; expected 0, 1 or {words}"
    return parsed


def _unknown_label(value: Any, taxonomy: Taxonomy) -> str:
    close = difflib.get_close_matches(str(value), taxonomy.intent_names, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"intent: unknown label {value!r}{hint}; known: {', '.join(taxonomy.intent_names)}"


def _context_from(data: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    """Structured context: our metadata first (what select wrote), then a list under "context", else none."""
    meta = data.get(META_KEY)
    if isinstance(meta, dict) and "context" in meta:
        return _check_context(meta["context"])
    if isinstance(data.get("context"), list):
        return _check_context(data["context"])
    return [], None


def _labelled_record(
    task_name: str,
    text: Any,
    data: dict[str, Any],
    labels: dict[str, list[Any]],
    taxonomy: Taxonomy,
    warnings: list[str],
) -> tuple[dict[str, Any] | None, list[str]]:
    """One labelled example from a task's text, data and chosen values per head, or its problems."""
    problems = []
    if not isinstance(text, str) or not clean_text(text):
        problems.append("text: missing or empty")
    intents = labels.get("intent") or []
    intent = None
    if not intents:
        problems.append("intent: missing (the annotation chooses no intent)")
    elif len(intents) > 1:
        problems.append(f"intent: {len(intents)} intents chosen {intents}; choose one")
    elif intents[0] not in taxonomy.intent2id:
        problems.append(_unknown_label(intents[0], taxonomy))
    else:
        intent = intents[0]
    values: dict[str, int | None] = {}
    for head in ("urgent", "refund_recoverable"):
        chosen = labels.get(head) or []
        if len(chosen) > 1:
            problems.append(f"{head}: {len(chosen)} values chosen {chosen}; choose one")
            continue
        parsed = _binary_label(head, chosen[0]) if chosen else None
        if isinstance(parsed, str):
            problems.append(parsed)
        else:
            values[head] = parsed
    context, ctx_problem = _context_from(data)
    if ctx_problem:
        problems.append(f"context: {ctx_problem}")
    if problems:
        return None, problems
    refund = values.get("refund_recoverable")
    if refund is not None and taxonomy.route_of(intent) != "refund_triage":
        # the tool can keep a refund choice made before the annotator changed the intent
        warnings.append(
            f"{task_name}: refund_recoverable ignored: intent {intent!r} does not route to refund_triage"
        )
        refund = None
    meta = data.get(META_KEY) if isinstance(data.get(META_KEY), dict) else {}
    record = {
        **(meta.get("row") or {}),
        "text": text,
        "context": context,
        "intent": intent,
        "urgent": values.get("urgent"),
        "refund_recoverable": refund,
        "label_source": task_name,
    }
    return record, []


def _task_name(tool: str, task: Any, position: int) -> str:
    tid = task.get("id") if isinstance(task, dict) else None
    return f"task {tid}" if tid is not None else f"task #{position} (no id)"


def _read_json_or_jsonl(path: Path) -> list[tuple[int | None, Any, str | None]]:
    """(line or None, item, problem) for a JSON list (Label Studio "JSON" export) or a JSONL file."""
    if not path.is_file():
        raise DataValidationError([f"{path}: file not found"], str(path))
    raw = path.read_bytes()
    head = raw.lstrip()[:1]
    if head == b"[":
        try:
            items = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataValidationError(
                [f"{path}: not a valid JSON list of tasks ({exc})"], str(path)
            ) from None
        return [(None, item, None) for item in items]
    return [(line, item, problem) for line, item, problem in _iter_jsonl(path)]


def _latest_annotation(task: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None, int]:
    """(the annotation to use, problem, how many usable ones): the most recently updated one not cancelled."""
    anns = task.get("annotations", task.get("completions"))  # "completions": Label Studio < 1.0 exports
    if anns is None:
        return (
            None,
            ("no 'annotations' list; export the project in Label Studio's JSON format (not JSON-MIN or CSV)"),
            0,
        )
    if not isinstance(anns, list) or not anns:
        return None, "not annotated (no annotations)", 0
    usable = [a for a in anns if isinstance(a, dict) and not a.get("was_cancelled")]
    if not usable:
        return None, "skipped: the annotation was cancelled (skipped) in Label Studio", 0
    usable.sort(key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), str(a.get("id") or "")))
    return usable[-1], None, len(usable)


def _choices_of(result: Any) -> tuple[dict[str, list[Any]], str | None]:
    if not isinstance(result, list):
        return {}, "annotation result must be a list"
    labels: dict[str, list[Any]] = {}
    for item in result:
        if not isinstance(item, dict) or item.get("from_name") not in (
            "intent",
            "urgent",
            "refund_recoverable",
        ):
            continue  # other controls (a comment box, ...) are not labels of this project
        value = item.get("value") or {}
        choices = value.get("choices") if isinstance(value, dict) else None
        if not isinstance(choices, list):
            return {}, f"{item['from_name']}: expected a choices result, got {item.get('type')!r}"
        labels.setdefault(item["from_name"], []).extend(choices)
    return labels, None


def parse_label_studio(
    path: str | Path, taxonomy: Taxonomy
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(records, problems, warnings) from a Label Studio JSON export (a list of tasks with annotations)."""
    path = Path(path)
    records, problems, warnings = [], [], []
    for position, (line, task, parse_problem) in enumerate(_read_json_or_jsonl(path), start=1):
        where = f"{path}:{line}" if line else str(path)
        name = _task_name("label-studio", task, position)
        if parse_problem:
            problems.append(f"{where}: {parse_problem}")
            continue
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            problems.append(f"{where}: {name}: must be a task object with 'data' and 'annotations'")
            continue
        ann, problem, n_usable = _latest_annotation(task)
        if problem:
            problems.append(f"{where}: {name}: {problem}")
            continue
        labels, problem = _choices_of(ann.get("result"))
        if problem:
            problems.append(f"{where}: {name}: {problem}")
            continue
        if n_usable > 1:
            warnings.append(f"{name}: {n_usable} annotations; the most recently updated one is used")
        record, issues = _labelled_record(
            f"label-studio {name}", task["data"].get("text"), task["data"], labels, taxonomy, warnings
        )
        problems += [f"{where}: {name}: {p}" for p in issues]
        if record is not None:
            records.append(record)
    return records, problems, warnings


def parse_doccano(path: str | Path, taxonomy: Taxonomy) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(records, problems, warnings) from a doccano text-classification export (JSONL: id, text, label list)."""
    path = Path(path)
    heads = {v: head for head, pair in DOCCANO_BINARY.items() for v in pair}
    records, problems, warnings = [], [], []
    for position, (line, row, parse_problem) in enumerate(_read_json_or_jsonl(path), start=1):
        where = f"{path}:{line}" if line else str(path)
        name = _task_name("doccano", row, position)
        if parse_problem:
            problems.append(f"{where}: {parse_problem}")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: {name}: must be a JSON object with text and label")
            continue
        raw = row.get("label", row.get("labels"))
        if raw is None or raw == []:
            problems.append(f"{where}: {name}: not annotated (empty label list)")
            continue
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            problems.append(f"{where}: {name}: label must be a list of label names, got {raw!r}")
            continue
        labels: dict[str, list[Any]] = {}
        for value in raw:
            prefix, _, rest = value.partition(":")
            if value in heads:
                labels.setdefault(heads[value], []).append(value)
            elif rest and prefix in DOCCANO_BINARY:  # "urgent:1" spelling
                labels.setdefault(prefix, []).append(rest)
            else:  # anything else must be an intent (unknown ones are named as such)
                labels.setdefault("intent", []).append(value)
        record, issues = _labelled_record(f"doccano {name}", row.get("text"), row, labels, taxonomy, warnings)
        problems += [f"{where}: {name}: {p}" for p in issues]
        if record is not None:
            records.append(record)
    return records, problems, warnings


def import_labels(
    path: str | Path, fmt: str, taxonomy: Taxonomy | None = None, drop_invalid: bool = False
) -> tuple[list[dict[str, Any]], list[str]]:
    """(labelled records in the project's format, warnings); raises DataValidationError naming every bad task
    unless ``drop_invalid`` (then bad tasks are left out and their problems returned among the warnings)."""
    taxonomy = taxonomy or load_taxonomy()
    parsers = {"label-studio": parse_label_studio, "doccano": parse_doccano}
    if fmt not in parsers:
        raise LabellingError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    records, problems, warnings = parsers[fmt](path, taxonomy)
    if problems and not drop_invalid:
        raise DataValidationError(
            problems,
            str(path),
            hint="Fix these tasks in the tool and export again, or pass "
            "--drop-invalid to import only the good ones.",
        )
    if not records:
        raise DataValidationError([f"{path}: no labelled tasks"] + problems, str(path))
    return records, [f"dropped: {p}" for p in problems] + warnings


# ---------------------------------------------------------------------------------------------------
# CLI entry points (kefu_triage.cli)
# ---------------------------------------------------------------------------------------------------
def run_select(args: Any) -> int:
    """`kefu-triage select`: choose messages to label and write them for Label Studio or doccano."""
    sel = select(
        args.artifact,
        args.input,
        args.n,
        args.strategy,
        args.seed,
        args.reference,
        args.precision,
        args.drop_invalid,
    )
    files = write_selection(sel, args.format, args.output)
    preds = Counter(sel.prediction(i)["intent"] for i in range(len(sel.records)))
    for note in sel.notes:
        print(f"note: {note}", file=sys.stderr)
    print(
        f"selected {len(sel.records)} of {sel.pool_size} distinct messages ({sel.strategy}); "
        f"predicted intents: {', '.join(f'{k} {v}' for k, v in preds.most_common())}"
    )
    print("wrote " + " and ".join(str(f) for f in files))
    return 0


def run_import_labels(args: Any) -> int:
    """`kefu-triage import-labels`: a tool's export -> labelled JSONL for data=custom."""
    taxonomy = load_taxonomy(args.taxonomy)
    records, warnings = import_labels(args.export, args.format, taxonomy, args.drop_invalid)
    atomic_write_jsonl(args.output, records)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    partial = {h: sum(r[h] is None for r in records) for h in ("urgent",)}
    refund_missing = sum(
        r["refund_recoverable"] is None and taxonomy.route_of(r["intent"]) == "refund_triage" for r in records
    )
    print(
        f"wrote {len(records)} labelled example(s) to {args.output}"
        + (f"; urgent not labelled for {partial['urgent']}" if partial["urgent"] else "")
        + (
            f"; refund_recoverable not labelled for {refund_missing} refund example(s)"
            if refund_missing
            else ""
        )
    )
    return 0
