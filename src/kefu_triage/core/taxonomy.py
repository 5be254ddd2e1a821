"""The label contract: intents, their default routes, and the head definitions.

Torch-free and YAML-optional: the runtime rebuilds a Taxonomy from the JSON stored in the artifact
(``Taxonomy.from_dict``); only ``load_taxonomy`` on a YAML file needs PyYAML (a train-extra dependency).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kefu_triage.core.resources import packaged_config

ROUTES = ("bot", "human", "refund_triage")

# Packaged copy of the contract, so the project never needs ../shared at run time.
DEFAULT_TAXONOMY_PATH = packaged_config("taxonomy", "ecommerce_zh")


class TaxonomyError(ValueError):
    """A taxonomy file or dict that does not follow the label contract."""


@dataclass(frozen=True)
class Intent:
    name: str
    route: str
    zh: str = ""
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class Taxonomy:
    intents: tuple[Intent, ...]
    heads: dict[str, Any] = field(default_factory=dict)
    version: int | str = 1
    source: str = "<dict>"

    # ---- lookups -------------------------------------------------------------------------------
    @property
    def intent_names(self) -> list[str]:
        return [i.name for i in self.intents]

    @property
    def num_intents(self) -> int:
        return len(self.intents)

    @property
    def id2intent(self) -> dict[int, str]:
        return dict(enumerate(self.intent_names))

    @property
    def intent2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.intent_names)}

    @property
    def routes(self) -> list[str]:
        """Route of each intent, aligned with ``intent_names``."""
        return [i.route for i in self.intents]

    def route_of(self, intent: str) -> str:
        try:
            return self.intents[self.intent2id[intent]].route
        except KeyError:
            raise TaxonomyError(
                f"unknown intent {intent!r} (taxonomy {self.source}); known: {self.intent_names}"
            ) from None

    @property
    def refund_intents(self) -> list[str]:
        """Intents whose route is ``refund_triage``: the only ones with a refund_recoverable label."""
        return [i.name for i in self.intents if i.route == "refund_triage"]

    def intent_id(self, intent: str) -> int:
        try:
            return self.intent2id[intent]
        except KeyError:
            raise TaxonomyError(
                f"unknown intent {intent!r} (taxonomy {self.source}); known: {self.intent_names}"
            ) from None

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form. Intents are a list: their order defines the model's class ids, and JSON writers
        that sort keys (transformers' config.json does) must not reorder them."""
        return {
            "version": self.version,
            "intents": [
                {"name": i.name, "route": i.route, "zh": i.zh, "examples": list(i.examples)}
                for i in self.intents
            ],
            "heads": self.heads,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Taxonomy:
        if not isinstance(data, dict):
            raise TaxonomyError(
                f"{source}: a taxonomy must be a mapping with an 'intents' key, got {type(data).__name__}"
            )
        raw = data.get("intents")
        if isinstance(raw, list) and all(isinstance(x, dict) and "name" in x for x in raw):  # to_dict() form
            raw = {x["name"]: {k: v for k, v in x.items() if k != "name"} for x in raw}
        if not isinstance(raw, dict) or not raw:
            raise TaxonomyError(
                f"{source}: 'intents' must be a non-empty mapping of intent name -> {{route: ...}}"
            )
        intents = []
        for name, spec in raw.items():
            if not isinstance(name, str) or not name.strip():
                raise TaxonomyError(f"{source}: intent names must be non-empty strings, got {name!r}")
            if not isinstance(spec, dict) or "route" not in spec:
                raise TaxonomyError(f"{source}: intents.{name} needs a 'route' (one of {list(ROUTES)})")
            route = spec["route"]
            if route not in ROUTES:
                raise TaxonomyError(
                    f"{source}: intents.{name}.route is {route!r}; must be one of {list(ROUTES)}"
                )
            intents.append(
                Intent(
                    name=name,
                    route=route,
                    zh=str(spec.get("zh", "")),
                    examples=tuple(spec.get("examples", ()) or ()),
                )
            )
        if len(intents) < 2:
            raise TaxonomyError(f"{source}: at least two intents are needed, got {len(intents)}")
        heads = data.get("heads") or {}
        if not isinstance(heads, dict):
            raise TaxonomyError(f"{source}: 'heads' must be a mapping")
        return cls(intents=tuple(intents), heads=dict(heads), version=data.get("version", 1), source=source)


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load a taxonomy YAML (or JSON) file; ``None`` means the packaged ``ecommerce_zh`` contract."""
    from kefu_triage.core.fileio import read_yaml_or_json

    path = Path(path) if path is not None else DEFAULT_TAXONOMY_PATH
    try:
        data = read_yaml_or_json(path, "taxonomy")
    except (FileNotFoundError, ValueError) as exc:
        raise TaxonomyError(str(exc)) from None
    return Taxonomy.from_dict(data, source=str(path))


def taxonomy_from_config(cfg: Any) -> Taxonomy:
    """Build a Taxonomy from the Hydra ``taxonomy`` node (the YAML content itself, or ``{path: ...}``)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - runtime-only install
        pass
    if isinstance(cfg, (str, Path)):
        return load_taxonomy(cfg)
    if isinstance(cfg, dict) and "path" in cfg and "intents" not in cfg:
        return load_taxonomy(cfg["path"])
    return Taxonomy.from_dict(cfg, source="config:taxonomy")
