"""docs/config.md (scripts/write_config_reference.py) is current, lists every config key, covers the shipped configs.

The expected keys are collected by walking the dataclasses here, independently of the renderer.
"""

import dataclasses
import importlib.util
import re
import sys
import typing
from pathlib import Path

import pytest
import yaml

from diffalign.objectives import available_objectives, get_objective_spec
from diffalign.training.config import ObjectiveSection, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "config.md"
REGENERATE = "docs/config.md is out of date; regenerate it: python scripts/write_config_reference.py"


def _script():
    path = ROOT / "scripts" / "write_config_reference.py"
    spec = importlib.util.spec_from_file_location("write_config_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["write_config_reference"] = module
    spec.loader.exec_module(module)
    return module


def _sections() -> dict[str, set[str]]:
    """Heading -> the keys of the table under it, parsed from docs/config.md."""
    sections, heading = {}, None
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ")
            sections[heading] = set()
        elif m := re.match(r"\| `([^`]+)` \|", line):
            sections[heading].add(m.group(1))
    return sections


def _objective_keys(sections, name: str) -> set[str]:
    return {"objective.name"}.union(*(keys for h, keys in sections.items() if f"`objective: {name}`" in h))


def _walk(cls, prefix: str = "") -> set[str]:
    """Every dotted key of dataclass ``cls`` (nested dataclass fields: the field itself and its keys)."""
    keys, hints = set(), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.add(prefix + f.name)
        tp = hints[f.name]
        sub = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
        if sub is not None and sub is not ObjectiveSection:
            keys |= _walk(sub, f"{prefix}{f.name}.")
    return keys


def _flatten(node, prefix: str = ""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip(".")


def test_doc_is_generated_from_the_dataclasses():
    assert DOC.is_file(), REGENERATE
    assert DOC.read_text() == _script().render(), REGENERATE


def test_every_field_of_every_section_and_objective_is_a_row():
    sections = _sections()
    rows = set().union(*sections.values())
    missing = _walk(TrainConfig) - rows
    assert not missing, f"{sorted(missing)} missing; {REGENERATE}"
    assert len(available_objectives()) >= 6
    for name in available_objectives():
        expected = {f"objective.{k}" for k in _walk(get_objective_spec(name).config_cls)} | {"objective.name"}
        missing = expected - _objective_keys(sections, name)
        assert not missing, f"objective {name}: {sorted(missing)} missing; {REGENERATE}"
    assert "objective.encoder.channels" in _objective_keys(sections, "ppd")  # nested sections are walked
    assert "objective.params" not in rows  # internal, not a config key


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_uses_only_documented_keys(path):
    data = yaml.safe_load(path.read_text())
    for section, key in {"model": "pretrained", "dataset": "source", "objective": "name"}.items():
        if isinstance(data.get(section), str):
            data[section] = {key: data[section]}
    sections = _sections()
    allowed = set().union(*(keys for h, keys in sections.items() if "`objective:" not in h))
    allowed |= _objective_keys(sections, data["objective"]["name"])
    unknown = sorted(set(_flatten(data)) - allowed)
    assert not unknown, f"{path.name}: keys not in docs/config.md: {unknown}"


def test_shipped_configs_are_found():
    assert len(CONFIGS) >= 10 and not any(p.parent.name == "robot" for p in CONFIGS)
