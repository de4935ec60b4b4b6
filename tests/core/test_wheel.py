"""A non-editable install carries what the library reads at run time: the toy pipelines, pairs and prompt lists are
package data (``diffalign/assets``), found through the installed package, not a source checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_wheel_holds_the_assets_the_demo_and_eval_read(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("diffalign-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    from diffalign.toy import assets_path

    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "diffalign" / "assets").rglob("*") if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)[:5]
    for needed in ("diffalign/assets/toy-sd/model_index.json", "diffalign/assets/toy-pairs",
                   "diffalign/assets/prompts"):
        assert any(n.startswith(needed) for n in names), needed
    assert assets_path().resolve() == (ROOT / "diffalign" / "assets").resolve()
