"""The mutation check (scripts/mutation_check.py): every planted loss-layer mistake is caught by a fast test.

The first test is instant and fails as soon as a refactor moves code a mutation edits; the second runs the whole
check (about 5 minutes on 2 CPU cores) and keeps docs/mutations.md in step with the mutation list.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_every_mutation_applies_once_and_names_existing_tests():
    mc = _script()
    assert len(mc.MUTATIONS) >= 25
    for mu in mc.MUTATIONS:
        mc.apply((ROOT / mu.file).read_text(), mu)  # raises unless the snippet occurs exactly once
        for target in mu.tests:
            path, _, name = target.partition("::")
            assert (ROOT / path).is_file(), f"{mu.name}: no test file {path}"
            if name:
                assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), (
                    f"{mu.name}: no test {name} in {path}")
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", (ROOT / "docs" / "mutations.md").read_text(), re.M))
    assert documented == {mu.name for mu in mc.MUTATIONS}, "regenerate: python scripts/mutation_check.py --write-docs"


@pytest.mark.slow
def test_every_mutation_is_caught(tmp_path):
    mc = _script()
    rc = mc.main(["--jobs", "2", "--json", str(tmp_path / "results.json")])
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    survivors = [r["name"] for r in results if r["status"] != "caught"]
    assert rc == 0 and not survivors, f"not caught: {survivors}"
