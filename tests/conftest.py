import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fixtures live in tests/fixtures (not in the library): `import fixtures.<module>` from any test
sys.path.insert(0, str(Path(__file__).parent))

from fixtures.data import write_pickapic_parquet


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    from fixtures.tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd15", "sd15")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from fixtures.tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def pickapic_dir(tmp_path_factory):
    return write_pickapic_parquet(tmp_path_factory.mktemp("data") / "pickapic")
