"""Helpers for tests and examples: small Pick-a-Pic-schema data sets and tiny-model configs, all offline."""

from __future__ import annotations

import io


def png_bytes(color, size=(40, 36)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, tuple(int(c) for c in color)).save(buf, "PNG")
    return buf.getvalue()


def write_pickapic_parquet(path, n=12, tie_every=3, seed=0):
    """A Pick-a-Pic-schema parquet: every ``tie_every``-th row is a tie; others alternate winners."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n):
        rows["caption"].append(f"a prompt number {i}")
        rows["jpg_0"].append(png_bytes(rng.integers(0, 255, 3)))
        rows["jpg_1"].append(png_bytes(rng.integers(0, 255, 3)))
        if tie_every and i % tie_every == tie_every - 1:
            labels = (0.5, 0.5)
        else:
            labels = (1.0, 0.0) if i % 2 == 0 else (0.0, 1.0)
        rows["label_0"].append(labels[0])
        rows["label_1"].append(labels[1])
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path / "train.parquet")
    return path


def base_config(model_dir, data_dir, out_dir, **overrides):
    cfg = {
        "model": {"pretrained": str(model_dir), "lora": {"rank": 4}},
        "dataset": {"source": str(data_dir), "resolution": 32},
        "objective": "dpo",
        "output_dir": str(out_dir),
        "max_steps": 3,
        "batch_size": 2,
        "log_every": 1,
        "report_to": None,
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 0},
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg
