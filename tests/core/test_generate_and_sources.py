import io
import tarfile

import pytest
import torch

from diffalign.cli import main
from diffalign.data import PreferencePairs
from fixtures.data import png_bytes


def test_generate_cli_with_lora_differs_from_base(tiny_sd15_dir, tmp_path):
    from diffalign.models.loading import load_components
    from diffalign.models.lora import add_lora, save_lora

    c = load_components(tiny_sd15_dir)
    add_lora(c.unet, rank=4, alpha=8, init=False)  # random A and B: a visible change
    with torch.no_grad():
        for n, p in c.unet.named_parameters():
            if "lora_B" in n:
                p.mul_(50)
    save_lora(c.unet, tmp_path / "lora")
    common = ["--model", tiny_sd15_dir, "--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32"]
    assert main(["generate", *common, "--out", str(tmp_path / "base")]) == 0
    assert main(["generate", *common, "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "lora_out")]) == 0
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "base" / "0000_00.png"), dtype=float)
    b = np.asarray(Image.open(tmp_path / "lora_out" / "0000_00.png"), dtype=float)
    assert a.shape == (32, 32, 3) and np.abs(a - b).max() > 0


def test_webdataset_shards_are_read(tmp_path):
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(4):
            files = {
                "jpg_0.png": png_bytes((255, 0, 0)), "jpg_1.png": png_bytes((0, 0, 255)),
                "label_0.txt": b"1" if i % 2 == 0 else b"0", "label_1.txt": b"0" if i % 2 == 0 else b"1",
                "caption.txt": f"prompt {i}".encode(),
            }
            for name, data in files.items():
                info = tarfile.TarInfo(f"{i:05d}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ds = PreferencePairs(str(path))
    assert len(ds) == 4
    item = ds[1]
    assert item["caption"] == "prompt 1"
    # row 1 has label_1 = 1, so the winner is the blue jpg_1
    assert item["pixels_w"][2].mean() > 0.9 and item["pixels_w"][0].mean() < -0.9


def test_generate_help_lists_every_flag_it_accepts(capsys):
    """`diffalign generate` hands any user flag to `diffalign personalize`, so its --help lists all of them too."""
    import re

    def options(command):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", capsys.readouterr().out))

    generate, personalize = options("generate"), options("personalize")
    assert {"--user-examples", "--user-mix", "--user", "--mix-space", "--user-scale", "--branch"} <= generate
    assert personalize <= generate, sorted(personalize - generate)
