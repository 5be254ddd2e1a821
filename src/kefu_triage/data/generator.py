"""Embedded default dataset: hand-written seed messages expanded by compositional templates.

Sources (shipped in the package, ``resources/``):
- ``seed/<intent>.jsonl``: hand-written messages, each with a ``seed_id``;
- ``templates/<intent>.yaml``: templates per intent (id, labels, surface forms with ``{slots}``, optional
  previous turns); every ``*.yaml`` there other than ``lexicon.yaml`` is read (one file or many);
- ``templates/lexicon.yaml``: slot lexicons, affixes, urgency cues, previous turns, noise tables, the mix;
- ``templates/dialogues.yaml`` (optional): multi-turn dialogue families whose current turn is elliptical and
  takes its intent from the previous turns, shared filler turns, and the share of topic-switch snippets.

Splits measure generalisation: whole groups (a seed message, a template, a dialogue family; the urgency cues
too) go to one
split, stratified per intent and source by labels, so dev/test hold messages and phrasings never seen in
training; a dev/test text whose normalised form occurs in an earlier split is dropped (seeds) or redrawn
(templates), and counted. Deterministic for a seed: only ``random.Random`` instances, over sorted inputs.
"""

from __future__ import annotations

import json
import math
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from kefu_triage.core.inputs import clean_text
from kefu_triage.core.resources import resource_path
from kefu_triage.core.taxonomy import Taxonomy, load_taxonomy

RESOURCES = resource_path()
SEED_DIR = RESOURCES / "seed"
TEMPLATE_DIR = RESOURCES / "templates"
LEXICON_FILE = "lexicon.yaml"
DIALOGUE_FILE = "dialogues.yaml"
SPLITS = ("train", "dev", "test")
SLOT = re.compile(r"\{(\w+)\}")
ROLES = ("customer", "agent")
TEMPLATE_KEYS = {"id", "u", "r", "t", "c"}
DIALOGUE_KEYS = {"id", "u", "r", "lead", "c", "a", "t"}
# previous turns a generated snippet may carry (the deciding turn of a topic thread can sit 5 turns back)
MAX_PREVIOUS_TURNS = 6
FILLER_KEYS = ("agent_hello", "customer_hello", "agent_wait", "customer_ack", "agent_ack", "cards")
DIALOGUE_SOURCES = ("dialogue", "dialogue_switch")
LEXICON_REQUIRED = (
    "mix",
    "slots",
    "prefixes",
    "suffixes",
    "urgent_cues",
    "homophones",
    "traditional",
    "protected_terms",
)
END_PUNCT = "？?！!。.~～ ，,"
PUNCT_RUNS_CALM = ("？？", "???", "。。。", "...", "～～", "~~", "？？？", "？")
PUNCT_RUNS_URGENT = ("!!!", "！！！", "？！", "?!", "！！")
PLACEHOLDER = re.compile(r"\[[^\[\]\s]{1,6}\]")  # [订单x] [金额x] [表情] ...: desensitised spans stay intact


class GeneratorError(ValueError):
    """Broken generator resources or arguments (names the file, entry or argument)."""


# ---------------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    intent: str
    id: str
    urgent: int
    refund: int | None
    patterns: tuple[str, ...]
    context: tuple[tuple[str, str], ...]
    file: str

    @property
    def group_id(self) -> str:
        return f"tpl:{self.intent}:{self.id}"


@dataclass(frozen=True)
class Dialogue:
    """A dialogue family: openers (customer), follow-ups (agent) and the elliptical replies they decide."""

    intent: str
    id: str
    urgent: int
    refund: int | None
    lead: str  # "agent" | "customer": whose earlier turn decides the intent
    openers: tuple[str, ...]
    follow_ups: tuple[str, ...]
    replies: tuple[str, ...]

    @property
    def group_id(self) -> str:
        return f"dlg:{self.intent}:{self.id}"


@dataclass(frozen=True)
class Resources:
    templates: tuple[Template, ...]
    lexicon: dict[str, Any]
    dialogues: tuple[Dialogue, ...] = ()
    # fillers, switch_share, turn weights and ``lexicon``: lexicon.yaml plus the dialogue-only slots
    dialogue_settings: dict[str, Any] | None = None


def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise GeneratorError(f"{path}: cannot read generator resource: {exc}") from None


def _seed_problems(row: dict[str, Any], taxonomy: Taxonomy) -> list[str]:
    problems = []
    if not isinstance(row.get("text"), str) or not row["text"].strip():
        problems.append("text: missing or empty")
    intent = row.get("intent")
    if intent not in taxonomy.intent_names:
        problems.append(f"intent: {intent!r} is not in the taxonomy ({taxonomy.source})")
    if row.get("urgent") not in (0, 1) or isinstance(row.get("urgent"), bool):
        problems.append(f"urgent: must be 0 or 1, got {row.get('urgent')!r}")
    refund = row.get("refund_recoverable")
    if intent in taxonomy.intent_names:
        route = taxonomy.route_of(intent)
        if route == "refund_triage" and (refund not in (0, 1) or isinstance(refund, bool)):
            problems.append(f"refund_recoverable: must be 0 or 1 for {intent}, got {refund!r}")
        if route != "refund_triage" and refund is not None:
            problems.append(f"refund_recoverable: must be null for {intent} (route {route})")
    context = row.get("context") or []
    if not isinstance(context, list) or any(
        not isinstance(t, dict) or t.get("role") not in ROLES or not isinstance(t.get("text"), str)
        for t in context
    ):
        problems.append("context: must be a list of {'role': 'customer'|'agent', 'text': str}")
    return problems


def load_seeds(seed_dir: str | Path | None = None, taxonomy: Taxonomy | None = None) -> list[dict[str, Any]]:
    """All seed messages of ``seed_dir`` (``*.jsonl``), sorted by seed_id; with a taxonomy, labels are checked.

    Raises GeneratorError naming ``file:line`` for invalid JSON, a missing or duplicate seed_id and (with
    ``taxonomy``) every invalid label.
    """
    seed_dir = Path(seed_dir or SEED_DIR)
    seeds, problems, where = [], [], {}
    for path in sorted(seed_dir.glob("*.jsonl")) if seed_dir.is_dir() else []:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise GeneratorError(f"{path}: cannot read seed file: {exc}") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GeneratorError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("seed_id"), str) or not row["seed_id"]:
                raise GeneratorError(f"{path}:{lineno}: seed messages need a seed_id (a non-empty string)")
            issues = _seed_problems(row, taxonomy) if taxonomy is not None else []
            if row["seed_id"] in where:
                issues.append(f"seed_id {row['seed_id']!r} already used at {where[row['seed_id']]}")
            problems += [f"{path}:{lineno}: {p}" for p in issues]
            where[row["seed_id"]] = f"{path.name}:{lineno}"
            seeds.append(row)
    if problems:
        raise GeneratorError(f"{len(problems)} problem(s) in seed messages:\n" + "\n".join(problems))
    return sorted(seeds, key=lambda r: r["seed_id"])


def _check_lexicon(lexicon: Any, path: Path) -> dict[str, Any]:
    if not isinstance(lexicon, dict):
        raise GeneratorError(f"{path}: must be a mapping")
    missing = [k for k in LEXICON_REQUIRED if k not in lexicon]
    if missing:
        raise GeneratorError(f"{path}: missing key(s) {missing}")
    for key in ("prefixes", "suffixes", "urgent_cues", "protected_terms"):
        if not isinstance(lexicon[key], list) or not all(isinstance(x, (str, int)) for x in lexicon[key]):
            raise GeneratorError(f"{path}: {key} must be a list of strings")
    if not isinstance(lexicon["slots"], dict):
        raise GeneratorError(f"{path}: slots must map slot names to lists of values")
    for slot, values in lexicon["slots"].items():
        if not isinstance(values, list) or not values:
            raise GeneratorError(f"{path}: slots.{slot} must be a non-empty list")
    for key in ("mix", "urgent_rate"):
        for name, weight in (lexicon.get(key) or {}).items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise GeneratorError(f"{path}: {key}.{name} must be a non-negative number, got {weight!r}")
    lex = dict(lexicon)
    lex["slots"] = {k: [str(v) for v in vals] for k, vals in lexicon["slots"].items()}
    lex["homophones"] = {
        str(k): [str(x) for x in (v if isinstance(v, list) else [v])]
        for k, v in lexicon["homophones"].items()
    }
    lex["traditional"] = {str(k): str(v) for k, v in lexicon["traditional"].items()}
    lex["simplified"] = {v: k for k, v in sorted(lex["traditional"].items())}
    lex["urgent_rate"] = dict(lexicon.get("urgent_rate") or {})
    for key in (
        "prefixes",
        "suffixes",
        "urgent_cues",
        "protected_terms",
        "cards",
        "calm_cues",
        "urgent_prefixes",
        "urgent_suffixes",
        "cue_excluded_intents",
        "agent_turns",
        "customer_turns",
        "handoff_turns",
        "handoff_hellos",
        "handoff_greetings",
    ):
        lex[key] = [str(x) for x in (lexicon.get(key) or [])]
    share = lexicon.get("handoff_share", 0.0)
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share <= 1:
        raise GeneratorError(f"{path}: handoff_share must be a number in [0, 1], got {share!r}")
    return lex


def _check_slots(text: str, lexicon: dict[str, Any], where: str) -> None:
    for slot in SLOT.findall(text):
        if slot not in lexicon["slots"]:
            raise GeneratorError(f"{where}: unknown slot {{{slot}}} (slots are defined in {LEXICON_FILE})")


def _intent_items(
    data: Any,
    path: Path,
    taxonomy: Taxonomy,
    what: str,
    needs: str,
    allowed: set[str] | frozenset[str],
    prefix: str,
):
    """``(intent, is a refund intent, item, where)`` of a resource mapping intent -> list of mappings, checked."""
    for intent, items in data.items():
        if intent not in taxonomy.intent_names:
            raise GeneratorError(f"{path}: intent {intent!r} is not in the taxonomy ({taxonomy.source})")
        if not isinstance(items, list):
            raise GeneratorError(f"{path}: {prefix}{intent} must be a list of {what}s")
        refund_intent = taxonomy.route_of(intent) == "refund_triage"
        for i, item in enumerate(items):
            where = f"{path}: {intent}[{i}]" + (f" (id {item.get('id')})" if isinstance(item, dict) else "")
            if not isinstance(item, dict):
                raise GeneratorError(f"{where}: a {what} must be a mapping with {needs}")
            unknown = sorted(set(item) - allowed)
            if unknown:
                raise GeneratorError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
            yield intent, refund_intent, item, where


def _parse_templates(data: Any, path: Path, taxonomy: Taxonomy, lexicon: dict[str, Any]) -> list[Template]:
    if not isinstance(data, dict):
        raise GeneratorError(f"{path}: must map intent names to lists of templates")
    out = []
    for intent, refund_intent, item, where in _intent_items(
        data, path, taxonomy, "template", "id, u, t", TEMPLATE_KEYS, ""
    ):
        if item.get("id") in (None, ""):
            raise GeneratorError(f"{where}: missing id")
        if item.get("u") not in (0, 1) or isinstance(item.get("u"), bool):
            raise GeneratorError(f"{where}: u (urgent) must be 0 or 1")
        if refund_intent and (item.get("r") not in (0, 1) or isinstance(item.get("r"), bool)):
            raise GeneratorError(f"{where}: r (refund_recoverable) must be 0 or 1 for {intent}")
        if not refund_intent and item.get("r") is not None:
            raise GeneratorError(f"{where}: r (refund_recoverable) is only allowed on refund_triage intents")
        patterns = item.get("t")
        if (
            not isinstance(patterns, list)
            or not patterns
            or not all(isinstance(p, str) and p.strip() for p in patterns)
        ):
            raise GeneratorError(f"{where}: t must be a non-empty list of non-empty strings")
        context = []
        for turn in item.get("c") or []:
            if not (
                isinstance(turn, list) and len(turn) == 2 and turn[0] in ROLES and isinstance(turn[1], str)
            ):
                raise GeneratorError(f"{where}: c must be a list of [role, text] with role customer|agent")
            context.append((turn[0], turn[1]))
        for text in list(patterns) + [t for _, t in context]:
            _check_slots(text, lexicon, where)
        out.append(
            Template(
                intent,
                str(item["id"]),
                int(item["u"]),
                item.get("r") if refund_intent else None,
                tuple(patterns),
                tuple(context),
                path.name,
            )
        )
    return out


def _strings(value: Any, where: str, allow_empty: bool = False) -> tuple[str, ...]:
    if value is None and allow_empty:
        return ()
    if (
        not isinstance(value, list)
        or not all(isinstance(x, (str, int)) and str(x).strip() for x in value)
        or (not value and not allow_empty)
    ):
        raise GeneratorError(
            f"{where}: must be a {'' if allow_empty else 'non-empty '}list of non-empty strings"
        )
    return tuple(str(x) for x in value)


def _parse_dialogues(
    data: Any, path: Path, taxonomy: Taxonomy, lexicon: dict[str, Any]
) -> tuple[tuple[Dialogue, ...], dict[str, Any]]:
    """Dialogue families and settings of ``dialogues.yaml``; GeneratorError naming the file and entry."""
    if not isinstance(data, dict) or not isinstance(data.get("families"), dict):
        raise GeneratorError(f"{path}: must be a mapping with families (intent -> list of dialogue families)")
    slots = data.get("slots") or {}
    if not isinstance(slots, dict):
        raise GeneratorError(f"{path}: slots must map slot names to lists of values")
    clash = sorted(set(slots) & set(lexicon["slots"]))
    if clash:
        raise GeneratorError(f"{path}: slots {clash} are already defined in {LEXICON_FILE}")
    dlex = {
        **lexicon,
        "slots": {
            **lexicon["slots"],
            **{str(k): list(_strings(v, f"{path}: slots.{k}")) for k, v in slots.items()},
        },
    }
    fillers = data.get("fillers")
    if not isinstance(fillers, dict):
        raise GeneratorError(f"{path}: fillers must be a mapping with {list(FILLER_KEYS)}")
    fill_turns = {key: _strings(fillers.get(key), f"{path}: fillers.{key}") for key in FILLER_KEYS}
    share = data.get("switch_share", 0.25)
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share <= 1:
        raise GeneratorError(f"{path}: switch_share must be a number in [0, 1], got {share!r}")
    turns = data.get("turns") or {1: 1}
    if (
        not isinstance(turns, dict)
        or not turns
        or any(
            k not in range(1, MAX_PREVIOUS_TURNS + 1)
            or not isinstance(w, (int, float))
            or isinstance(w, bool)
            or w < 0
            for k, w in turns.items()
        )
        or not sum(turns.values())
    ):
        raise GeneratorError(
            f"{path}: turns must map numbers of previous turns (1-{MAX_PREVIOUS_TURNS}) to non-negative weights"
        )
    thread_share = data.get("thread_share", 0.0)
    if (
        not isinstance(thread_share, (int, float))
        or isinstance(thread_share, bool)
        or not 0 <= thread_share <= 1
    ):
        raise GeneratorError(f"{path}: thread_share must be a number in [0, 1], got {thread_share!r}")
    mix = data.get("mix") or {}
    if not isinstance(mix, dict) or any(
        k not in taxonomy.intent_names or not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0
        for k, w in mix.items()
    ):
        raise GeneratorError(f"{path}: mix must map taxonomy intents to non-negative weights")
    out, seen = [], set()
    for intent, refund_intent, item, where in _intent_items(
        data["families"], path, taxonomy, "dialogue family", "id, u, lead, t", DIALOGUE_KEYS, "families."
    ):
        if item.get("id") in (None, "") or (intent, str(item["id"])) in seen:
            raise GeneratorError(f"{where}: missing or repeated id")
        seen.add((intent, str(item["id"])))
        if item.get("u") not in (0, 1) or isinstance(item.get("u"), bool):
            raise GeneratorError(f"{where}: u (urgent) must be 0 or 1")
        if refund_intent and (item.get("r") not in (0, 1) or isinstance(item.get("r"), bool)):
            raise GeneratorError(f"{where}: r (refund_recoverable) must be 0 or 1 for {intent}")
        if not refund_intent and item.get("r") is not None:
            raise GeneratorError(f"{where}: r (refund_recoverable) is only allowed on refund_triage intents")
        lead = item.get("lead")
        openers = _strings(item.get("c"), f"{where}: c", allow_empty=True)
        follow_ups = _strings(item.get("a"), f"{where}: a", allow_empty=True)
        if lead not in ROLES or not (openers if lead == "customer" else follow_ups):
            raise GeneratorError(
                f"{where}: lead must be customer (needs c: openers) or agent (needs a: "
                f"follow-ups), got {lead!r}"
            )
        replies = _strings(item.get("t"), f"{where}: t")
        for text in openers + follow_ups + replies:
            _check_slots(text, dlex, where)
        out.append(
            Dialogue(
                intent,
                str(item["id"]),
                int(item["u"]),
                item.get("r") if refund_intent else None,
                lead,
                openers,
                follow_ups,
                replies,
            )
        )
    for key, texts in fill_turns.items():
        for text in texts:
            _check_slots(text, dlex, f"{path}: fillers.{key}")
    for values in dlex["slots"].values():  # slot values may hold slots themselves ({title})
        for value in values:
            _check_slots(value, dlex, f"{path}: slot value {value!r}")
    settings = {
        "fillers": fill_turns,
        "switch_share": float(share),
        "thread_share": float(thread_share),
        "lexicon": dlex,
        "mix": dict(mix),
        "turns": {int(k): float(w) for k, w in sorted(turns.items())},
    }
    return tuple(out), settings


@lru_cache(maxsize=8)
def _load_resources_cached(template_dir: str, stamp: tuple, taxonomy_json: str) -> Resources:
    tdir = Path(template_dir)
    taxonomy = Taxonomy.from_dict(json.loads(taxonomy_json))
    lexicon = _check_lexicon(_load_yaml(tdir / LEXICON_FILE), tdir / LEXICON_FILE)
    templates: list[Template] = []
    for path in sorted(tdir.glob("*.yaml")):
        if path.name not in (LEXICON_FILE, DIALOGUE_FILE):
            templates += _parse_templates(_load_yaml(path), path, taxonomy, lexicon)
    if not templates:
        raise GeneratorError(f"{tdir}: no templates (<intent>.yaml files next to {LEXICON_FILE})")
    seen: dict[str, str] = {}
    for t in templates:
        if t.group_id in seen:
            raise GeneratorError(
                f"{tdir / t.file}: template id {t.id!r} of {t.intent} already used in {seen[t.group_id]}"
            )
        seen[t.group_id] = t.file
    for key in ("mix", "urgent_rate"):
        unknown = sorted(set(lexicon.get(key) or {}) - set(taxonomy.intent_names) - {"default"})
        if unknown:
            raise GeneratorError(f"{tdir / LEXICON_FILE}: {key} names intents not in the taxonomy: {unknown}")
    for text in (
        lexicon["urgent_cues"]
        + lexicon["calm_cues"]
        + lexicon["agent_turns"]
        + lexicon["customer_turns"]
        + lexicon["handoff_turns"]
        + lexicon["handoff_hellos"]
        + lexicon["handoff_greetings"]
    ):
        _check_slots(text, lexicon, f"{tdir / LEXICON_FILE}: {text!r}")
    dialogues, settings = ((), None)
    if (tdir / DIALOGUE_FILE).is_file():
        dialogues, settings = _parse_dialogues(
            _load_yaml(tdir / DIALOGUE_FILE), tdir / DIALOGUE_FILE, taxonomy, lexicon
        )
    return Resources(tuple(templates), lexicon, dialogues, settings)


def load_resources(template_dir: str | Path | None = None, taxonomy: Taxonomy | None = None) -> Resources:
    """Validated templates and lexicon of ``template_dir`` (cached while its files are unchanged)."""
    tdir = Path(template_dir or TEMPLATE_DIR)
    if not (tdir / LEXICON_FILE).is_file():
        raise GeneratorError(f"{tdir}: no {LEXICON_FILE} (slot lexicons, affixes, noise tables, intent mix)")
    taxonomy = taxonomy or load_taxonomy()
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(tdir.glob("*.yaml")))
    return _load_resources_cached(str(tdir.resolve()), stamp, json.dumps(taxonomy.to_dict(), sort_keys=True))


# ---------------------------------------------------------------------------------------------------
# Surface variation
# ---------------------------------------------------------------------------------------------------
def normalise_text(text: str, lexicon: Mapping[str, Any] | None = None) -> str:
    """The key for exact-text leakage: NFKC, lower case, traditional folded to simplified (with a lexicon),
    without whitespace and punctuation. Texts equal under it count as the same message across splits."""
    text = unicodedata.normalize("NFKC", clean_text(text)).lower()
    if lexicon:
        table = lexicon["simplified"]
        text = "".join(table.get(ch, ch) for ch in text)
    key = "".join(
        ch
        for ch in text
        if not (
            ch.isspace() or unicodedata.category(ch)[0] == "P" or unicodedata.category(ch) in ("Sm", "Sk")
        )
    )
    return key or text.strip()


def fill(text: str, lexicon: Mapping[str, Any], rng: random.Random) -> str:
    """Fill ``{slot}``s; the same slot twice in one text gets two different values when it can."""
    used: dict[str, set[str]] = defaultdict(set)

    def pick(match: re.Match) -> str:
        values = lexicon["slots"][match.group(1)]
        fresh = [v for v in values if v not in used[match.group(1)]] or values
        value = rng.choice(fresh)
        used[match.group(1)].add(value)
        return value

    return SLOT.sub(pick, text)


def protected_mask(text: str, terms: list[str]) -> list[bool]:
    """True for every character inside a protected term (a word that carries the label) or a placeholder."""
    mask = [False] * len(text)
    for m in PLACEHOLDER.finditer(text):
        for i in range(m.start(), m.end()):
            mask[i] = True
    for term in terms:
        start = text.find(term)
        while start >= 0:
            for i in range(start, start + len(term)):
                mask[i] = True
            start = text.find(term, start + 1)
    return mask


def _homophone(text: str, lexicon: Mapping[str, Any], rng: random.Random, mask: list[bool]) -> str:
    spots = []
    for src in sorted(lexicon["homophones"]):
        start = text.find(src)
        while start >= 0:
            if not any(mask[start : start + len(src)]):
                spots.append((start, src))
            start = text.find(src, start + 1)
    if not spots:
        return text
    start, src = rng.choice(spots)
    return text[:start] + rng.choice(lexicon["homophones"][src]) + text[start + len(src) :]


def _traditional(text: str, lexicon: Mapping[str, Any], rng: random.Random, mask: list[bool]) -> str:
    table = lexicon["traditional"]
    return "".join(
        table[ch] if ch in table and not mask[i] and rng.random() < 0.9 else ch for i, ch in enumerate(text)
    )


def _width(text: str, rng: random.Random, mask: list[bool]) -> str:
    out = []
    for i, ch in enumerate(text):
        if mask[i]:
            out.append(ch)
        elif "!" <= ch <= "~" and rng.random() < 0.7:
            out.append(chr(ord(ch) + 0xFEE0))  # half-width ASCII -> full-width
        elif "！" <= ch <= "～" and rng.random() < 0.7:
            out.append(chr(ord(ch) - 0xFEE0))  # full-width -> half-width
        elif ch in "，。、" and rng.random() < 0.5:
            out.append({"，": ",", "。": ".", "、": ","}[ch])
        else:
            out.append(ch)
    return "".join(out)


def _spaces(text: str, rng: random.Random, mask: list[bool]) -> str:
    if " " in text and rng.random() < 0.6:
        return text.replace(" ", "")
    cuts = [
        i for i in range(1, len(text)) if not (mask[i - 1] and mask[i]) and " " not in text[i - 1 : i + 1]
    ]
    if not cuts:
        return text
    i = rng.choice(cuts)
    return text[:i] + " " + text[i:]


def add_noise(
    text: str, lexicon: Mapping[str, Any], rng: random.Random, rate: float, urgent: bool = False
) -> str:
    """With probability ``rate``, one to three of: typos/homophones, traditional characters, punctuation runs,
    full/half-width switching, dropped punctuation, spaces added or removed, the message sent twice.

    Characters inside ``lexicon["protected_terms"]`` (退, 换, 投诉, 发票 ...) are never rewritten or split, so
    the label cannot change. "!!!"-style runs only go on urgent messages (they read as anger).
    """
    if not text or rng.random() >= rate:
        return text
    ops = ["homophone", "homophone", "traditional", "punct", "punct", "width", "nopunct", "spaces", "repeat"]
    for op in rng.sample(ops, 1 + (rng.random() < 0.35) + (rng.random() < 0.1)):
        mask = protected_mask(text, lexicon["protected_terms"])
        if op == "homophone":
            text = _homophone(text, lexicon, rng, mask)
        elif op == "traditional":
            text = _traditional(text, lexicon, rng, mask)
        elif op == "punct" and text.rstrip(END_PUNCT):
            text = text.rstrip(END_PUNCT) + rng.choice(
                PUNCT_RUNS_CALM + (PUNCT_RUNS_URGENT if urgent else ())
            )
        elif op == "width":
            text = _width(text, rng, mask)
        elif op == "nopunct":
            text = re.sub(r"\s+", " ", re.sub(r"[，。？！、,.?!~～]", " ", text)).strip() or text
        elif op == "spaces":
            text = _spaces(text, rng, mask)
        elif op == "repeat" and len(text) <= 20:  # chat windows often show the same message twice
            text = f"{text} {text}"
    return text


def decorate(
    text: str, lexicon: Mapping[str, Any], rng: random.Random, affix_rate: float, urgent: bool = False
) -> str:
    """Courtesy (on urgent messages also anxious) prefixes and suffixes, and now and then an order card."""
    if rng.random() < affix_rate:
        anxious = urgent and lexicon["urgent_prefixes"] and rng.random() < 0.4
        text = (
            rng.choice(lexicon["urgent_prefixes"] if anxious else lexicon["prefixes"])
            + rng.choice(("", " ", " ", "，"))
            + text
        )
    if rng.random() < affix_rate:
        anxious = urgent and lexicon["urgent_suffixes"] and rng.random() < 0.5
        text = (
            text
            + rng.choice(("", "", " "))
            + rng.choice(lexicon["urgent_suffixes"] if anxious else lexicon["suffixes"])
        )
    if lexicon["cards"] and rng.random() < float(lexicon.get("card_rate", 0.0)):
        card = fill(rng.choice(lexicon["cards"]), lexicon, rng)
        text = f"{card} {text}" if rng.random() < 0.5 else f"{text} {card}"
    return text


def neutral_context(lexicon: Mapping[str, Any], rng: random.Random) -> list[dict[str, str]]:
    """With ``neutral_context_rate``: one or two previous turns that do not decide the label (an agent turn
    from ``agent_turns``, sometimes a customer turn before it). Real turns come mid-conversation."""
    if not lexicon["agent_turns"] or rng.random() >= float(lexicon.get("neutral_context_rate", 0.0)):
        return []
    if lexicon.get("handoff_turns") and rng.random() < float(lexicon.get("handoff_share", 0.0)):
        # a chat handed from the bot to a person: the customer's "转人工" (or the platform's notice of it)
        # sits right before the first real question and says nothing about what that question wants
        turns = [{"role": "customer", "text": fill(rng.choice(lexicon["handoff_turns"]), lexicon, rng)}]
        after = rng.random()
        if after < 0.3 and lexicon.get("handoff_hellos"):
            turns.append({"role": "customer", "text": rng.choice(lexicon["handoff_hellos"])})
        elif after < 0.7 and lexicon.get("handoff_greetings"):
            turns.append(
                {"role": "agent", "text": fill(rng.choice(lexicon["handoff_greetings"]), lexicon, rng)}
            )
        return turns
    turns = [{"role": "agent", "text": fill(rng.choice(lexicon["agent_turns"]), lexicon, rng)}]
    if lexicon["customer_turns"] and rng.random() < 0.4:
        turns.insert(
            0, {"role": "customer", "text": fill(rng.choice(lexicon["customer_turns"]), lexicon, rng)}
        )
    return turns


# ---------------------------------------------------------------------------------------------------
# Dialogue snippets: the current turn takes its intent from the previous turns
# ---------------------------------------------------------------------------------------------------
def fill_nested(text: str, lexicon: Mapping[str, Any], rng: random.Random) -> str:
    """:func:`fill`, repeated while slot values bring slots of their own ({title} -> {clothes})."""
    for _ in range(3):
        if not SLOT.search(text):
            break
        text = fill(text, lexicon, rng)
    return text


def dialogue_context(
    family: Dialogue, settings: Mapping[str, Any], rng: random.Random, n_turns: int | None = None
) -> list[dict[str, str]]:
    """``n_turns`` previous turns or fewer (oldest first; 1-4 drawn from the settings' weights when None) that hold
    the family's deciding turn: its agent follow-up (lead agent) or its customer opener (lead customer).

    Around it, as in real chats: the opener before an agent question (often), "亲 稍等 为您核实" and an
    acknowledgement between opener and answer, a product or order card, greetings at the start."""
    fillers, dlex = settings["fillers"], settings["lexicon"]
    if n_turns is None:
        n_turns = rng.choices(list(settings["turns"]), list(settings["turns"].values()))[0]

    def turn(role: str, texts: tuple[str, ...]) -> dict[str, str]:
        return {"role": role, "text": fill_nested(rng.choice(texts), dlex, rng)}

    turns = []
    if family.openers and (family.lead == "customer" or (n_turns > 1 and rng.random() < 0.7)):
        turns.append(turn("customer", family.openers))
    if family.lead == "agent" or (n_turns > 1 and family.follow_ups and rng.random() < 0.75):
        turns.append(turn("agent", family.follow_ups))
    elif n_turns > 1 and rng.random() < 0.4:  # customer-led, not answered yet: the agent only asked to wait
        turns.append(turn("agent", fillers["agent_wait"]))
    if len(turns) + 2 <= n_turns and rng.random() < float(settings.get("thread_share", 0.0)):
        # a topic thread: the customer already followed up in the same topic and the agent answered, so the
        # deciding turn sits further back, as in long real chats about one return or one parcel
        answers = fillers["agent_ack"] + fillers["agent_wait"]
        if family.lead == "customer" and family.follow_ups:
            answers = answers + family.follow_ups
        for _ in range(min(2, (n_turns - len(turns)) // 2)):
            turns += [turn("customer", family.replies), turn("agent", answers)]
            if rng.random() < 0.5:
                break
    opener = bool(family.openers) and turns[0]["role"] == "customer"
    pads = ["wait", "card", "hello"] if opener and len(turns) == 2 else ["card", "hello"]
    n_hello = 0  # greetings stay first, a card goes after them
    while len(turns) < n_turns and pads:
        pad = rng.choice(pads)
        pads.remove(pad)
        if pad == "wait":  # between the opener and the answer: the deciding turn moves further back
            extra = [turn("agent", fillers["agent_wait"])]
            if len(turns) + 2 <= n_turns and rng.random() < 0.5:
                extra.append(turn("customer", fillers["customer_ack"]))
            turns[1:1] = extra
        elif pad == "card":
            turns.insert(n_hello, turn("customer", fillers["cards"]))
        else:
            hello = [turn("agent", fillers["agent_hello"])]
            if len(turns) + 2 <= n_turns and rng.random() < 0.6:
                hello.insert(0, turn("customer", fillers["customer_hello"]))
            turns[:0] = hello
            n_hello = len(hello)
    return turns[-MAX_PREVIOUS_TURNS:]


def topic_context(
    families: Sequence[Dialogue], intent: str, settings: Mapping[str, Any], rng: random.Random
) -> list[dict[str, str]]:
    """Previous turns about one of ``families``' topics before a message of ``intent`` that stands alone and
    decides its own label.

    The earlier topic is answered and closed half of the time, and always before a greeting or remark, which
    would otherwise read as an answer to a pending agent question."""
    family = rng.choice(list(families))
    context = dialogue_context(family, settings, rng, MAX_PREVIOUS_TURNS)
    if intent in ("greeting", "other") or rng.random() < 0.5:
        context += [
            {"role": "customer", "text": fill_nested(rng.choice(family.replies), settings["lexicon"], rng)},
            {
                "role": "agent",
                "text": fill_nested(rng.choice(settings["fillers"]["agent_ack"]), settings["lexicon"], rng),
            },
        ]
    n_turns = rng.choices(list(settings["turns"]), list(settings["turns"].values()))[0]
    return context[-n_turns:]


def _dialogue_row(
    family: Dialogue,
    settings: Mapping[str, Any],
    lex: Mapping[str, Any],
    rng: random.Random,
    noise_rate: float,
    affix_rate: float,
) -> dict[str, Any]:
    """An elliptical current turn of ``family`` after 1-4 previous turns that decide its intent."""
    context = dialogue_context(family, settings, rng)
    urgent = bool(family.urgent)
    said = {t["text"] for t in context if t["role"] == "customer"}
    for _ in range(4):  # a topic thread's earlier follow-up is not sent again as the current turn
        text = fill_nested(rng.choice(family.replies), settings["lexicon"], rng)
        if text not in said:
            break
    # fewer affixes than templates: short replies in real chats rarely carry a greeting
    text = add_noise(decorate(text, lex, rng, affix_rate / 2, urgent), lex, rng, noise_rate, urgent)
    return _record(text, context, family.intent, family.urgent, family.refund, family.group_id, "dialogue")


def _switch_row(
    intent: str,
    families: list[Dialogue],
    settings: Mapping[str, Any],
    rng: random.Random,
    alone_row: Callable[[str, random.Random], dict[str, Any] | None],
) -> dict[str, Any] | None:
    """A message that stands alone (``alone_row``: a template of ``intent`` without fixed context) after
    previous turns about another topic: the context must not decide the label here."""
    others = [f for f in families if f.intent != intent]
    # one in five after the same topic: the message decides, whatever the context is about
    same = [f for f in families if f.intent == intent]
    pool = same if same and rng.random() < 0.2 else others
    rec = alone_row(intent, rng) if others else None
    if rec is None:
        return None
    return {**rec, "context": topic_context(pool, intent, settings, rng), "source": "dialogue_switch"}


# ---------------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------------
def _check_fractions(dev_fraction: float, test_fraction: float) -> None:
    if not (0 <= dev_fraction < 1 and 0 <= test_fraction < 1 and dev_fraction + test_fraction < 1):
        raise GeneratorError(
            f"dev_fraction={dev_fraction}, test_fraction={test_fraction}: each must be in [0, 1) "
            "and their sum below 1"
        )


def assign_unit(
    strata: Mapping[Any, list[str]], rng: random.Random, dev_fraction: float, test_fraction: float
) -> dict[str, str]:
    """group id -> split for one unit (one intent's seeds, or its templates), stratified by label.

    Groups are shuffled within each stratum and the strata concatenated; systematic sampling with a random
    phase then gives every stratum its share of dev and test. A unit with >= 3 groups always has a group in
    dev and one in test (when those fractions are > 0), so rare intents are still evaluated.
    """
    items: list[str] = []
    for key in sorted(strata, key=str):
        groups = sorted(set(strata[key]))
        rng.shuffle(groups)
        items += groups
    acc_dev, acc_test = rng.random(), rng.random()
    out: dict[str, str] = {}
    for gid in items:
        acc_dev += dev_fraction
        acc_test += test_fraction
        if acc_dev >= 1:
            out[gid], acc_dev = "dev", acc_dev - 1
        elif acc_test >= 1:
            out[gid], acc_test = "test", acc_test - 1
        else:
            out[gid] = "train"
    if len(items) >= 3:
        for split, fraction in (("dev", dev_fraction), ("test", test_fraction)):
            train = [g for g in items if out[g] == "train"]
            if fraction > 0 and split not in out.values() and len(train) > 1:
                out[rng.choice(train)] = split
    return out


def _assign_all(
    seeds: list[dict[str, Any]],
    templates: tuple[Template, ...],
    n_cues: int,
    seed: int,
    dev_fraction: float,
    test_fraction: float,
    dialogues: tuple[Dialogue, ...] = (),
) -> dict[str, str]:
    _check_fractions(dev_fraction, test_fraction)
    rng = random.Random(f"kefu-triage-splits-{seed}")  # its own stream: generation settings never move groups
    units: dict[tuple[str, str], dict[Any, list[str]]] = defaultdict(lambda: defaultdict(list))
    for s in seeds:
        units[(s["intent"], "seed")][
            (s["urgent"], s.get("refund_recoverable"), bool(s.get("context")))
        ].append(f"seed:{s['seed_id']}")
    for t in templates:
        units[(t.intent, "template")][(t.urgent, t.refund, bool(t.context))].append(t.group_id)
    units[("", "cue")][0] = [f"cue:{i}" for i in range(n_cues)]
    split_of: dict[str, str] = {}
    for unit in sorted(units):
        split_of.update(assign_unit(units[unit], rng, dev_fraction, test_fraction))
    # dialogue families: one unit per intent, stratified by labels, on their own stream so that adding
    # dialogues never moves a seed or template group
    drng = random.Random(f"kefu-triage-dialogue-splits-{seed}")
    dunits: dict[str, dict[Any, list[str]]] = defaultdict(lambda: defaultdict(list))
    for d in dialogues:
        dunits[d.intent][(d.urgent, d.refund)].append(d.group_id)
    for intent in sorted(dunits):
        split_of.update(assign_unit(dunits[intent], drng, dev_fraction, test_fraction))
    return split_of


def group_splits(
    seed: int = 13,
    dev_fraction: float = 0.15,
    test_fraction: float = 0.15,
    taxonomy: Taxonomy | None = None,
    seed_dir: str | Path | None = None,
    template_dir: str | Path | None = None,
) -> dict[str, str]:
    """group id -> "train" | "dev" | "test", exactly as ``generate_splits`` with the same arguments assigns it.

    Group ids: ``seed:<seed_id>``, ``tpl:<intent>:<template id>``, ``dlg:<intent>:<dialogue id>``,
    ``cue:<index>`` (urgency cues)."""
    taxonomy = taxonomy or load_taxonomy()
    res = load_resources(template_dir, taxonomy)
    seeds = load_seeds(seed_dir, taxonomy)
    return _assign_all(
        seeds,
        res.templates,
        len(res.lexicon["urgent_cues"]),
        seed,
        dev_fraction,
        test_fraction,
        res.dialogues,
    )


def split_of_group(
    group_id: str,
    seed: int = 13,
    dev_fraction: float = 0.15,
    test_fraction: float = 0.15,
    taxonomy: Taxonomy | None = None,
    seed_dir: str | Path | None = None,
    template_dir: str | Path | None = None,
) -> str:
    """The split of one group (a record's ``group_id``); GeneratorError for an unknown group."""
    splits = group_splits(seed, dev_fraction, test_fraction, taxonomy, seed_dir, template_dir)
    if group_id not in splits:
        raise GeneratorError(
            f"unknown group id {group_id!r} (expected seed:<seed_id>, tpl:<intent>:<id>, "
            "dlg:<intent>:<id> or cue:<n>)"
        )
    return splits[group_id]


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------
def _record(
    text: str,
    context: list[dict[str, str]],
    intent: str,
    urgent: int,
    refund: int | None,
    group_id: str,
    source: str,
) -> dict[str, Any]:
    return {
        "text": text,
        "context": context,
        "intent": intent,
        "urgent": int(urgent),
        "refund_recoverable": refund,
        "group_id": group_id,
        "source": source,
    }


def largest_remainder(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Integer counts summing to ``total`` in proportion to ``weights`` (ties broken by name)."""
    names = sorted(weights)
    norm = sum(weights.values())
    if total <= 0 or norm <= 0:
        return dict.fromkeys(names, 0)
    exact = {n: total * weights[n] / norm for n in names}
    counts = {n: math.floor(exact[n]) for n in names}
    for n in sorted(names, key=lambda n: (-(exact[n] - counts[n]), n))[: total - sum(counts.values())]:
        counts[n] += 1
    return counts


class _SplitRows:
    """The rows of one split, refusing exact duplicates and texts already used by an earlier split."""

    def __init__(self, earlier: set[str], lexicon: Mapping[str, Any]):
        self.earlier, self.lexicon = earlier, lexicon
        self.rows: list[dict[str, Any]] = []
        self.keys: set[str] = set()

    def add(self, rec: dict[str, Any]) -> str:
        """ "ok", "duplicate" (same text with the same labels already here) or "leaked" (text of an earlier split).

        The same text may appear twice in a split only with different labels: a slot answer ("[订单x]") whose
        intent comes from the previous turns. A dialogue row's key includes its previous turns: "[订单x]" after
        another question is another example."""
        parts = [clean_text(rec["text"]), rec["intent"], rec["urgent"], rec["refund_recoverable"]]
        if rec["source"] == "dialogue":
            parts.append([(t["role"], clean_text(t["text"])) for t in rec["context"]])
        key = json.dumps(parts, ensure_ascii=False)
        if key in self.keys:
            return "duplicate"
        if normalise_text(rec["text"], self.lexicon) in self.earlier:
            return "leaked"
        self.keys.add(key)
        self.rows.append(rec)
        return "ok"


def _template_row(
    intent: str,
    rng: random.Random,
    pools: Mapping[tuple[str, str], list[Template]],
    *,
    split: str,
    cues: Mapping[str, list[str]],
    lex: Mapping[str, Any],
    urgent_rates: Mapping[str, float],
    refund_rate: float,
    noise_rate: float,
    affix_rate: float,
    refund_intents: frozenset[str],
) -> dict[str, Any] | None:
    """One template row of ``intent`` from the split's own templates (None when it has none). Everything
    after ``pools`` is fixed for a split (``generate_splits`` binds it once with functools.partial)."""
    pool = pools.get((split, intent))
    if not pool:
        return None
    urgent_rate = urgent_rates[intent]
    if intent in refund_intents:  # recoverable and firm both well represented, whatever the template counts
        want = int(rng.random() < refund_rate)
        pool = [t for t in pool if t.refund == want] or pool
    calm, hot = [t for t in pool if not t.urgent], [t for t in pool if t.urgent]
    cue_ok = bool(cues.get(split)) and intent not in lex["cue_excluded_intents"]
    cue = None
    if rng.random() < urgent_rate:
        # the same need said calmly + an urgency cue: urgency is the tone, not the topic
        if calm and cue_ok and (not hot or rng.random() < float(lex.get("cue_share", 0.35))):
            tpl, cue = rng.choice(calm), fill(rng.choice(cues[split]), lex, rng)
        else:
            tpl = rng.choice(hot or calm)
    else:
        tpl = rng.choice(calm or hot)
    text = fill(rng.choice(tpl.patterns), lex, rng)
    urgent = tpl.urgent
    if cue is not None:
        text = f"{cue} {text}" if rng.random() < 0.2 else f"{text}{rng.choice((' ', ' ', '，', ''))}{cue}"
        urgent = 1
    elif not urgent and cue_ok and lex["calm_cues"] and rng.random() < float(lex.get("calm_cue_rate", 0.0)):
        text = f"{text} {rng.choice(lex['calm_cues'])}"  # mild impatience stays urgent 0
    text = add_noise(decorate(text, lex, rng, affix_rate, bool(urgent)), lex, rng, noise_rate, bool(urgent))
    if tpl.context:
        context = [{"role": role, "text": fill(t, lex, rng)} for role, t in tpl.context]
    else:
        context = neutral_context(lex, rng)
    return _record(text, context, intent, urgent, tpl.refund, tpl.group_id, "template")


def generate_splits(
    seed: int = 13,
    size: int = 10000,
    dev_fraction: float = 0.15,
    test_fraction: float = 0.15,
    taxonomy: Taxonomy | None = None,
    seed_dir: str | Path | None = None,
    template_dir: str | Path | None = None,
    noise_rate: float = 0.3,
    affix_rate: float = 0.3,
    seed_variants: int = 2,
    max_seed_share: float = 0.6,
    refund_recoverable_rate: float = 0.5,
    dialogue_share: float = 0.2,
    fill_seed: int | None = None,
) -> dict[str, Any]:
    """{"train": [...], "dev": [...], "test": [...], "stats": {...}}.

    Each record: id, text, context (list, maybe empty), intent, urgent, refund_recoverable, group_id
    (``seed:<seed_id>``, ``tpl:<intent>:<id>`` or ``dlg:<intent>:<id>``) and source (seed | seed_variant |
    template | dialogue | dialogue_switch).

    ``size`` is the number of rows over the three splits, each split getting its fraction. A split holds
    every seed message of its groups once, then (train only) ``seed_variants`` noisy copies of each seed
    (affixes, noise, neutral previous turns), then ``dialogue_share`` of its rows as dialogue snippets
    (``dialogues.yaml``: an elliptical turn whose intent the previous turns decide; ``switch_share`` of them
    a message that stands alone after turns about another topic), then template rows up to its size, with
    per-intent quotas so the split follows the intent mix of ``lexicon.yaml``. Seeds and variants fill at
    most ``max_seed_share`` of the rest: with a small ``size`` variants go first, then seeds are subsampled
    per intent (counted).
    dev/test rows whose normalised text occurs in an earlier split are dropped (seeds) or redrawn
    (templates) and counted in ``stats``.
    ``seed`` alone decides which groups go to which split; ``fill_seed`` (default ``seed``) seeds everything
    drawn inside them, so another ``fill_seed`` gives fresh rows from the same training groups.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise GeneratorError(f"size must be a positive integer, got {size!r}")
    if not (
        0 <= noise_rate <= 1
        and 0 <= affix_rate <= 1
        and 0 < max_seed_share <= 1
        and 0 <= refund_recoverable_rate <= 1
    ):
        raise GeneratorError(
            "noise_rate, affix_rate, refund_recoverable_rate must be in [0, 1], max_seed_share in (0, 1]"
        )
    if (
        not isinstance(dialogue_share, (int, float))
        or isinstance(dialogue_share, bool)
        or not 0 <= dialogue_share < 1
    ):
        raise GeneratorError(f"dialogue_share must be a number in [0, 1), got {dialogue_share!r}")
    _check_fractions(dev_fraction, test_fraction)
    taxonomy = taxonomy or load_taxonomy()
    res = load_resources(template_dir, taxonomy)
    lex = res.lexicon
    seeds = load_seeds(seed_dir, taxonomy)
    split_of = _assign_all(
        seeds, res.templates, len(lex["urgent_cues"]), seed, dev_fraction, test_fraction, res.dialogues
    )
    rng = random.Random(seed if fill_seed is None else fill_seed)

    present = {t.intent for t in res.templates} | {s["intent"] for s in seeds}
    intents = [i for i in taxonomy.intent_names if i in present]
    missing_mix = [i for i in intents if i not in lex["mix"]]
    if missing_mix:
        raise GeneratorError(
            f"{Path(template_dir or TEMPLATE_DIR) / LEXICON_FILE}: mix has no weight for {missing_mix}"
        )
    mix = {i: float(lex["mix"][i]) for i in intents}
    default_rate = float(lex["urgent_rate"].get("default", 0.18))
    urgent_rate = {i: float(lex["urgent_rate"].get(i, default_rate)) for i in intents}
    split_sizes = largest_remainder(
        size, {"train": 1 - dev_fraction - test_fraction, "dev": dev_fraction, "test": test_fraction}
    )
    pools: dict[tuple[str, str], list[Template]] = defaultdict(list)
    for t in res.templates:
        pools[(split_of[t.group_id], t.intent)].append(t)
    cues: dict[str, list[str]] = defaultdict(list)
    for i, cue in enumerate(lex["urgent_cues"]):
        cues[split_of[f"cue:{i}"]].append(cue)
    dpools: dict[str, list[Dialogue]] = defaultdict(list)
    for d in res.dialogues:
        dpools[split_of[d.group_id]].append(d)
    settings = res.dialogue_settings or {}
    dialogue_share = float(dialogue_share) if res.dialogues else 0.0
    dmix = {i: float((settings.get("mix") or lex["mix"]).get(i, 0.0)) for i in intents}

    stats: dict[str, Any] = {
        "split_sizes": split_sizes,
        "dropped_duplicates": {},
        "dropped_leaked": {},
        "redrawn_leaked_templates": {},
        "seeds_left_out_for_size": {},
        "shortfall": {},
        "dialogue_rows": {},
        "dialogue_switch_rows": {},
        "redrawn_leaked_dialogues": {},
    }
    earlier: set[str] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    refund_intents = frozenset(i for i in intents if taxonomy.route_of(i) == "refund_triage")
    for split in SPLITS:
        bucket = _SplitRows(earlier, lex)
        n_dup = n_leak = n_redrawn = 0
        template_row = partial(
            _template_row,
            split=split,
            cues=cues,
            lex=lex,
            urgent_rates=urgent_rate,
            refund_rate=refund_recoverable_rate,
            noise_rate=noise_rate,
            affix_rate=affix_rate,
            refund_intents=refund_intents,
        )
        # 1. seed messages of this split's groups (subsampled per intent only when the split is too small)
        split_seeds = [s for s in seeds if split_of[f"seed:{s['seed_id']}"] == split]
        budget = math.floor(split_sizes[split] * max_seed_share * (1 - dialogue_share))
        left_out = 0
        if len(split_seeds) > budget:
            by_intent: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for s in split_seeds:
                by_intent[s["intent"]].append(s)
            keep = largest_remainder(budget, {i: len(v) for i, v in by_intent.items()})
            chosen = []
            for intent in sorted(by_intent):
                group = list(by_intent[intent])
                rng.shuffle(group)
                chosen += group[: keep[intent]]
            left_out = len(split_seeds) - len(chosen)
            split_seeds = sorted(chosen, key=lambda r: r["seed_id"])
        stats["seeds_left_out_for_size"][split] = left_out
        for s in split_seeds:
            status = bucket.add(
                _record(
                    s["text"],
                    list(s.get("context") or []),
                    s["intent"],
                    s["urgent"],
                    s.get("refund_recoverable"),
                    f"seed:{s['seed_id']}",
                    "seed",
                )
            )
            n_dup += status == "duplicate"
            n_leak += status == "leaked"
        # 2. noisy variants of train seeds: hand-written messages are the closest to real traffic
        if split == "train":
            room = budget - len(bucket.rows)
            for _ in range(seed_variants):
                for s in split_seeds:
                    if room <= 0:
                        break
                    urgent = bool(s["urgent"])
                    text = add_noise(decorate(s["text"], lex, rng, 0.6, urgent), lex, rng, 0.7, urgent)
                    own = list(s.get("context") or [])
                    context = own or neutral_context(lex, rng)
                    if normalise_text(text, lex) == normalise_text(s["text"], lex) and context == own:
                        continue  # nothing visible changed: not a variant
                    rec = _record(
                        text,
                        context,
                        s["intent"],
                        s["urgent"],
                        s.get("refund_recoverable"),
                        f"seed:{s['seed_id']}",
                        "seed_variant",
                    )
                    room -= bucket.add(rec) == "ok"
        # 3. dialogue snippets, on their own random stream (seed and template rows do not depend on them)
        n_dlg_redrawn = 0
        n_dlg = round(dialogue_share * split_sizes[split]) if dpools.get(split) else 0
        if n_dlg:
            drng = random.Random(f"kefu-triage-dialogues-{seed}-{split}")
            fams = dpools[split]
            alone = {(split, i): [t for t in pools.get((split, i), []) if not t.context] for i in intents}
            switch_intents = [i for i in intents if alone[(split, i)] and any(f.intent != i for f in fams)]
            n_switch = round(n_dlg * float(settings["switch_share"])) if switch_intents else 0
            fam_intents = [i for i in intents if any(f.intent == i for f in fams)]
            dquotas = largest_remainder(n_dlg - n_switch, {i: dmix[i] or mix[i] for i in fam_intents})
            for intent in fam_intents:
                own = [f for f in fams if f.intent == intent]
                made = attempts = 0
                while made < dquotas[intent] and attempts < 8 * dquotas[intent] + 20:
                    attempts += 1
                    want = int(drng.random() < refund_recoverable_rate)  # only matters for refund intents
                    family = drng.choice([f for f in own if f.refund in (None, want)] or own)
                    status = bucket.add(_dialogue_row(family, settings, lex, drng, noise_rate, affix_rate))
                    made += status == "ok"
                    n_dlg_redrawn += status == "leaked"
            made = attempts = 0
            while made < n_switch and attempts < 8 * n_switch + 20:
                attempts += 1
                intent = drng.choices(switch_intents, [mix[i] for i in switch_intents])[0]
                rec = _switch_row(intent, fams, settings, drng, partial(template_row, pools=alone))
                status = bucket.add(rec) if rec is not None else "none"
                made += status == "ok"
                n_dlg_redrawn += status == "leaked"
        # 4. template rows with per-intent quotas, so the whole split (seeds included) follows the mix; every
        # intent with templates in this split gets at least a quarter of its share from them
        have = Counter(r["intent"] for r in bucket.rows)
        wanted = largest_remainder(split_sizes[split], mix)
        need = {
            i: max(wanted[i] - have[i], math.ceil(0.25 * wanted[i])) if pools.get((split, i)) else 0
            for i in intents
        }
        quotas = largest_remainder(max(split_sizes[split] - len(bucket.rows), 0), need)
        for intent in intents:
            made = attempts = 0
            while made < quotas[intent] and attempts < 8 * quotas[intent] + 20:
                attempts += 1
                rec = template_row(intent, rng, pools)
                if rec is None:
                    break
                status = bucket.add(rec)
                made += status == "ok"
                n_redrawn += status == "leaked"
        # small template pools can saturate: top up from all intents by the mix
        order = [i for i in sorted(intents, key=lambda i: (-mix[i], i)) if pools.get((split, i))]
        attempts = 0
        while order and len(bucket.rows) < split_sizes[split] and attempts < 4 * split_sizes[split] + 100:
            attempts += 1
            intent = rng.choices(order, [mix[i] for i in order])[0]
            rec = template_row(intent, rng, pools)
            n_redrawn += bucket.add(rec) == "leaked"
        rows = bucket.rows[: split_sizes[split]]
        rng.shuffle(rows)
        out[split] = [{"id": f"{split}-{i:06d}", **r} for i, r in enumerate(rows)]
        stats["dropped_duplicates"][split] = n_dup
        stats["dropped_leaked"][split] = n_leak
        stats["redrawn_leaked_templates"][split] = n_redrawn
        stats["shortfall"][split] = split_sizes[split] - len(rows)
        stats["dialogue_rows"][split] = sum(r["source"] == "dialogue" for r in rows)
        stats["dialogue_switch_rows"][split] = sum(r["source"] == "dialogue_switch" for r in rows)
        stats["redrawn_leaked_dialogues"][split] = n_dlg_redrawn
        earlier |= {normalise_text(r["text"], lex) for r in rows}

    stats["groups"] = {s: len({r["group_id"] for r in out[s]}) for s in SPLITS}
    stats["template_groups"] = {
        s: len({r["group_id"] for r in out[s] if r["source"] == "template"}) for s in SPLITS
    }
    stats["dialogue_groups"] = {
        s: len({r["group_id"] for r in out[s] if r["source"] == "dialogue"}) for s in SPLITS
    }
    stats["sources"] = {s: dict(sorted(Counter(r["source"] for r in out[s]).items())) for s in SPLITS}
    stats["urgent_cues"] = {s: len(cues[s]) for s in SPLITS}
    return {**out, "stats": stats}
