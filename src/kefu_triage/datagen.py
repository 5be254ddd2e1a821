"""Embedded default dataset: hand-written seed messages expanded by compositional templates.

Sources (shipped in the package, ``resources/``):
- ``seed/<intent>.jsonl``: hand-written messages, each with a ``seed_id``;
- ``templates/<intent>.yaml``: templates per intent with labels and alternative surface forms;
- ``templates/lexicon.yaml``: slot lexicons, courtesy affixes, urgency cues, noise tables, the intent mix.

Splits measure generalisation: whole groups (a seed message, a template) go to one split, and the
urgency cues added to templates are partitioned too, so dev/test hold phrasings never seen in training.
Deterministic for a seed: only ``random.Random(seed)`` is used, over sorted inputs.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

from kefu_triage.taxonomy import Taxonomy, load_taxonomy
from kefu_triage.textproc import clean_text

RESOURCES = Path(__file__).resolve().parent / "resources"
SEED_DIR = RESOURCES / "seed"
TEMPLATE_DIR = RESOURCES / "templates"
SPLITS = ("train", "dev", "test")
SLOT = re.compile(r"\{(\w+)\}")
# characters that carry a label: noise never rewrites them
PROTECTED = set("退换款货投诉差评急人工保修装坏错少发票价消报警")


class GeneratorError(ValueError):
    """Broken generator resources (names the file and entry)."""


# ---------------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------------
def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise GeneratorError(f"{path}: cannot read generator resource: {exc}") from None


def load_seeds(seed_dir: Path | None = None) -> list[dict[str, Any]]:
    """All seed messages (validated later with the rest of the data)."""
    seed_dir = Path(seed_dir or SEED_DIR)
    seeds = []
    for path in sorted(seed_dir.glob("*.jsonl")) if seed_dir.is_dir() else []:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GeneratorError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if "seed_id" not in row:
                raise GeneratorError(f"{path}:{lineno}: seed messages need a seed_id")
            seeds.append(row)
    return seeds


def _load_templates(tdir: Path) -> dict[str, list[dict[str, Any]]]:
    """Templates per intent: ``templates.yaml`` (all intents) and/or ``<intent>.yaml`` files."""
    templates: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(tdir.glob("*.yaml")):
        if path.name == "lexicon.yaml":
            continue
        for intent, items in (_load_yaml(path) or {}).items():
            for item in items or []:
                for key in ("id", "u", "t"):
                    if key not in item:
                        raise GeneratorError(f"{path}: {intent}: a template lacks {key!r}: {item}")
                templates[intent].append({**item, "_file": path.name})
    for intent, items in templates.items():
        ids = [t["id"] for t in items]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise GeneratorError(f"{tdir}: {intent}: template ids used twice: {dup}")
    return dict(templates)


@lru_cache(maxsize=4)
def _resources(template_dir: str) -> tuple[dict, dict]:
    tdir = Path(template_dir)
    lexicon = _load_yaml(tdir / "lexicon.yaml")
    templates = _load_templates(tdir)
    if not templates:
        raise GeneratorError(f"{tdir}: no templates found (<intent>.yaml files)")
    for intent, items in templates.items():
        for item in items:
            for text in item["t"] + [turn[1] for turn in item.get("c", [])]:
                for slot in SLOT.findall(text):
                    if slot not in lexicon["slots"]:
                        raise GeneratorError(f"{tdir / item['_file']}: {intent}.{item['id']}: unknown slot {{{slot}}}")
    return templates, lexicon


# ---------------------------------------------------------------------------------------------------
# Surface variation
# ---------------------------------------------------------------------------------------------------
def fill(text: str, lexicon: dict, rng: random.Random) -> str:
    return SLOT.sub(lambda m: str(rng.choice(lexicon["slots"][m.group(1)])), text)


def add_noise(text: str, lexicon: dict, rng: random.Random, rate: float) -> str:
    """Typos/homophones, traditional characters, punctuation runs, width changes, dropped punctuation."""
    if rng.random() >= rate:
        return text
    kind = rng.choice(("homophone", "traditional", "punct", "width", "nopunct", "space"))
    if kind == "homophone":
        options = [(a, b) for a, b in sorted(lexicon["homophones"].items()) if a in text and not set(a) & PROTECTED]
        if options:
            a, b = rng.choice(options)
            text = text.replace(a, b if isinstance(b, str) else rng.choice(b), 1)
    elif kind == "traditional":
        table = {k: v for k, v in lexicon["traditional"].items() if k not in PROTECTED}
        text = "".join(table.get(ch, ch) if rng.random() < 0.7 else ch for ch in text)
    elif kind == "punct":
        text = text.rstrip("？?！!。.~ ") + rng.choice(("？？？", "!!!", "。。。", "？！", "～～", "?????"))
    elif kind == "width":  # full-width <-> half-width ASCII
        text = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" and rng.random() < 0.5 else c for c in text)
    elif kind == "nopunct":
        text = re.sub(r"[，。？！,.?!~～]", " ", text).strip() or text
    else:
        text = text.replace(" ", "") if " " in text else " ".join(text)
    return text


def decorate(text: str, lexicon: dict, rng: random.Random, affix_rate: float) -> str:
    if rng.random() < affix_rate:
        text = rng.choice(lexicon["prefixes"]) + ("" if rng.random() < 0.5 else " ") + text
    if rng.random() < affix_rate:
        text = text + rng.choice(lexicon["suffixes"])
    return text


# ---------------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------------
def assign_groups(groups_by_stratum: dict[str, list[str]], rng: random.Random, dev_fraction: float,
                  test_fraction: float) -> dict[str, str]:
    """group id -> split, stratified; every stratum with >= 3 groups has one in each split."""
    split_of: dict[str, str] = {}
    for stratum in sorted(groups_by_stratum):
        groups = sorted(set(groups_by_stratum[stratum]))
        rng.shuffle(groups)
        n = len(groups)
        n_dev = max(1, round(n * dev_fraction)) if n >= 3 else 0
        n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
        for i, g in enumerate(groups):
            split_of[g] = "dev" if i < n_dev else "test" if i < n_dev + n_test else "train"
    return split_of


def split_of_cue(index: int, n: int, dev_fraction: float, test_fraction: float) -> str:
    """Urgency cues are partitioned by position: the last ones are held out for dev and test."""
    n_dev, n_test = max(1, round(n * dev_fraction)), max(1, round(n * test_fraction))
    if index >= n - n_test:
        return "test"
    if index >= n - n_test - n_dev:
        return "dev"
    return "train"


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------
def distractor_context(lexicon: dict, rng: random.Random) -> list[dict[str, str]]:
    """One or two previous turns that do not decide the label (see lexicon.yaml: agent_turns)."""
    turns = [{"role": "agent", "text": fill(rng.choice(lexicon["agent_turns"]), lexicon, rng)}]
    if rng.random() < 0.4:
        turns.insert(0, {"role": "customer", "text": fill(rng.choice(lexicon["customer_turns"]), lexicon, rng)})
    return turns


def _key(record: dict[str, Any]) -> str:
    return clean_text(record["text"]) + "\x00" + json.dumps(record["context"], ensure_ascii=False)


def _record(text, context, intent, urgent, refund, group_id, source) -> dict[str, Any]:
    return {"text": text, "context": context, "intent": intent, "urgent": int(urgent),
            "refund_recoverable": refund, "group_id": group_id, "source": source}


def generate_splits(seed: int = 13, size: int = 12000, dev_fraction: float = 0.15, test_fraction: float = 0.15,
                    taxonomy: Taxonomy | None = None, seed_dir: str | Path | None = None,
                    template_dir: str | Path | None = None, noise_rate: float = 0.25, affix_rate: float = 0.3,
                    cue_rate: float = 0.08, seed_variants: int = 2, distractor_rate: float = 0.3) -> dict[str, Any]:
    """{"train": [...], "dev": [...], "test": [...], "stats": {...}}.

    ``size`` = rows across the splits: every seed message (plus ``seed_variants`` noisy copies of each train
    seed), then template rows up to ``size``; a size below the seed rows yields just the seed rows.
    """
    taxonomy = taxonomy or load_taxonomy()
    templates, lexicon = _resources(str(Path(template_dir or TEMPLATE_DIR)))
    unknown = sorted(set(templates) - set(taxonomy.intent_names))
    if unknown:
        raise GeneratorError(f"templates: intents not in the taxonomy ({taxonomy.source}): {unknown}")
    seeds = load_seeds(seed_dir)
    rng = random.Random(seed)

    # strata = intent x urgent x refund label, so every split gets e.g. firm and recoverable refunds
    groups: dict[str, list[str]] = defaultdict(list)
    for s in seeds:
        groups[f"{s['intent']}|{s['urgent']}|{s.get('refund_recoverable')}|seed"].append(f"seed:{s['seed_id']}")
    for intent, items in templates.items():
        for t in items:
            groups[f"{intent}|{t['u']}|{t.get('r')}|tpl"].append(f"tpl:{intent}:{t['id']}")
    split_of = assign_groups(groups, rng, dev_fraction, test_fraction)
    cues = lexicon["urgent_cues"]
    cues_by_split = defaultdict(list)
    for i, cue in enumerate(cues):
        cues_by_split[split_of_cue(i, len(cues), dev_fraction, test_fraction)].append(cue)

    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for s in sorted(seeds, key=lambda r: r["seed_id"]):  # every seed once, in its group's split
        gid = f"seed:{s['seed_id']}"
        out[split_of[gid]].append(_record(s["text"], s.get("context") or [], s["intent"], s["urgent"],
                                          s.get("refund_recoverable"), gid, "seed"))
        # hand-written messages are the closest to real traffic: training sees each a few more times, with
        # courtesy affixes and noise (duplicates are dropped below)
        if split_of[gid] == "train":
            for _ in range(seed_variants):
                text = add_noise(decorate(s["text"], lexicon, rng, 0.6), lexicon, rng, 0.6)
                context = s.get("context") or (distractor_context(lexicon, rng) if rng.random() < distractor_rate else [])
                out["train"].append(_record(text, context, s["intent"], s["urgent"],
                                            s.get("refund_recoverable"), gid, "seed_variant"))

    # template rows fill up to size, by the intent mix, each split getting its share
    mix = {i: float(w) for i, w in lexicon["mix"].items() if i in templates}
    intents, weights = sorted(mix), [mix[i] for i in sorted(mix)]
    targets = {"train": 1 - dev_fraction - test_fraction, "dev": dev_fraction, "test": test_fraction}
    n_templates = max(size - sum(len(v) for v in out.values()), 0)  # size counts seed rows too
    by_split_intent = defaultdict(list)
    for intent, items in templates.items():
        for t in items:
            by_split_intent[(split_of[f"tpl:{intent}:{t['id']}"], intent)].append(t)
    seen: dict[str, set[str]] = {sp: {_key(r) for r in out[sp]} for sp in SPLITS}
    for split in SPLITS:
        quota = round(n_templates * targets[split])
        made, attempts = 0, 0
        while made < quota and attempts < quota * 6:  # small template pools saturate: stop, don't loop
            attempts += 1
            intent = rng.choices(intents, weights)[0]
            pool = by_split_intent.get((split, intent)) or by_split_intent.get(("train", intent))
            if not pool:
                continue
            # urgent templates are drawn at half weight: most real messages are calm
            tpl = rng.choices(pool, [0.5 if t["u"] else 1.0 for t in pool])[0]
            text = fill(rng.choice(tpl["t"]), lexicon, rng)
            urgent = int(tpl["u"])
            if not urgent and rng.random() < cue_rate and cues_by_split[split]:
                text = f"{text} {fill(rng.choice(cues_by_split[split]), lexicon, rng)}"
                urgent = 1
            elif not urgent and rng.random() < cue_rate / 2:
                text = f"{text} {rng.choice(lexicon['calm_cues'])}"
            text = add_noise(decorate(text, lexicon, rng, affix_rate), lexicon, rng, noise_rate)
            context = [{"role": r, "text": fill(x, lexicon, rng)} for r, x in tpl.get("c", [])]
            if not context and rng.random() < distractor_rate:
                context = distractor_context(lexicon, rng)
            rec = _record(text, context, intent, urgent, tpl.get("r"), f"tpl:{intent}:{tpl['id']}", "template")
            if _key(rec) in seen[split]:
                continue
            seen[split].add(_key(rec))
            out[split].append(rec)
            made += 1

    # no exact text twice in a split, none of dev/test in train: dropped with counts in stats
    stats: dict[str, Any] = {"dropped_duplicates": {}, "dropped_leaked": {}}
    seen_before: set[str] = set()
    for split in SPLITS:
        kept, seen_here, dup, leak = [], set(), 0, 0
        for r in out[split]:
            key = _key(r)
            if key in seen_here:
                dup += 1
            elif clean_text(r["text"]) in seen_before:
                leak += 1
            else:
                seen_here.add(key)
                kept.append(r)
        stats["dropped_duplicates"][split], stats["dropped_leaked"][split] = dup, leak
        seen_before |= {clean_text(r["text"]) for r in kept}
        rng.shuffle(kept)
        for i, r in enumerate(kept):
            r["id"] = f"{split}-{i:06d}"
        out[split] = kept
    stats["groups"] = {s: len({r["group_id"] for r in out[s]}) for s in SPLITS}
    stats["sources"] = {s: dict(Counter(r["source"] for r in out[s])) for s in SPLITS}
    return {**out, "stats": stats}
