"""Every bad input we know of, fed the way a user would, and what the user sees. The table in
docs/reliability.md is written by this module (``test_write_table``), not by hand."""

import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffalign.cli import main
from diffalign.data import DatasetFormatError, PairTransform, PreferencePairs, collate_pairs
from fixtures.data import base_config, png_bytes
from diffalign.training import checkpoint as ckpt
from diffalign.training.config import ConfigError, parse_config

ROWS: list[tuple[str, str, str]] = []  # (category, input, what the user sees)
DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def record(category, what, seen):
    import re

    seen = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/]+/", ".../", seen)
    ROWS.append((category, what, seen.replace("\n", " ").replace("|", "\\|")))


def _png_with_header(width, height):
    """A valid-looking PNG whose header claims width x height (a decompression-bomb-sized image)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _mode_bytes(mode, fmt="PNG"):
    buf = io.BytesIO()
    Image.new(mode, (20, 16), 128 if mode in ("L", "P", "1") else (10, 200, 30, 255)[: len(mode)]).save(buf, fmt)
    return buf.getvalue()


BAD_IMAGES = {
    "corrupt bytes": b"\x89PNG garbage" + os.urandom(64),
    "truncated PNG": png_bytes((255, 0, 0), (64, 64))[:60],
    "zero-byte file": b"",
    "huge image (50000x50000 header)": _png_with_header(50000, 50000),
}
ODD_IMAGES = {
    "grayscale (L)": _mode_bytes("L"),
    "RGBA": _mode_bytes("RGBA"),
    "CMYK JPEG": _mode_bytes("CMYK", "JPEG"),
    "palette (P)": _mode_bytes("P"),
}


def manifest_with(tmp_path, loser_bytes: bytes | None, name="bad"):
    d = tmp_path / name
    d.mkdir()
    rows = []
    for i in range(3):
        (d / f"{i}_w.png").write_bytes(png_bytes((200, 10 * i, 0)))
        loser = d / f"{i}_l.png"
        if i == 1:
            if loser_bytes is not None:
                loser.write_bytes(loser_bytes)
        else:
            loser.write_bytes(png_bytes((0, 0, 200)))
        rows.append({"prompt": f"p{i}", "chosen": f"{i}_w.png", "rejected": f"{i}_l.png"})
    (d / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d / "m.jsonl"


@pytest.mark.parametrize("name", list(BAD_IMAGES) + ["missing file"])
def test_unreadable_images_are_skipped_and_counted(name, tmp_path):
    path = manifest_with(tmp_path, None if name == "missing file" else BAD_IMAGES[name])
    ds = PreferencePairs(str(path), transform=PairTransform(16))
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    assert batch["num_skipped"] == 1 and batch["size"] == 2
    assert [c for c in batch["captions"]] == ["p0", "p2"]  # never trained on the bad pair
    (index, reason), = batch["unreadable"]
    assert index == 1 and (name != "missing file" or "1_l.png" in reason)
    record("image", name, "pair skipped and counted once, by name (`unreadable` in summary.json, a line at the end "
           "of the run)")


@pytest.mark.parametrize("name", list(ODD_IMAGES))
def test_odd_modes_are_converted_to_rgb(name, tmp_path):
    path = manifest_with(tmp_path, ODD_IMAGES[name])
    ds = PreferencePairs(str(path), transform=PairTransform(16))
    item = ds[1]
    assert item is not None and item["pixels_l"].shape == (3, 16, 16)
    record("image", name, "converted to RGB and trained")


def pickapic(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pp"
    d.mkdir(exist_ok=True)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    pq.write_table(pa.table(cols), d / "train.parquet")
    return d


def row(caption="a prompt", l0=1.0, l1=0.0):
    return {"caption": caption, "jpg_0": png_bytes((255, 0, 0)), "jpg_1": png_bytes((0, 0, 255)),
            "label_0": l0, "label_1": l1}


def test_label_problems_are_dropped_and_counted(tmp_path):
    ds = PreferencePairs(str(pickapic(tmp_path, [row(), row(l0=0.5, l1=0.5), row(l0=float("nan")),
                                                 row(l0=3.0, l1=0.0), row(l0=0.0, l1=1.0)])))
    assert (ds.stats.kept, ds.stats.ties_dropped, ds.stats.bad_labels_dropped) == (2, 1, 2)
    record("labels", "tie (0.5/0.5)", "dropped and counted (`ties dropped N` at start); `dataset.keep_ties: true` "
           "keeps them")
    record("labels", "NaN label", "row dropped and counted (`bad labels N` at start)")
    record("labels", "label outside [0, 1]", "row dropped and counted (`bad labels N` at start)")


def test_text_problems(tmp_path):
    bad_utf8 = b"caf\xe9 \xff".decode("latin-1")
    ds = PreferencePairs(str(pickapic(tmp_path, [row(caption=""), row(caption=bad_utf8)])))
    assert ds.caption(0) == "" and ds.caption(1) == bad_utf8
    record("text", "empty prompt", "kept: trained as the unconditional prompt (what prompt dropout feeds too)")
    record("text", "non-UTF-8 bytes in a caption", "decoded (invalid bytes replaced), trained")


def test_missing_columns_one_line(tmp_path, capsys):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "a", "image": "b"}))
    with pytest.raises(DatasetFormatError) as err:
        PreferencePairs(str(path))
    assert "expected Pick-a-Pic columns" in str(err.value)
    record("dataset", "missing columns", f"one line: `{str(err.value).replace(str(tmp_path), '...')[:160]}...`")


CONFIG_CASES = {
    "unknown key": (lambda c: c.update(lr=1), "config error: lr: unknown key"),
    "wrong type": (lambda c: c.update(max_steps="ten"), "config error: max_steps: expected an integer, got 'ten'"),
    "negative beta": (lambda c: c.update(objective={"name": "dpo", "beta": -1}),
                      "config error: objective.beta: must be > 0, got -1.0"),
    "learning rate 0": (lambda c: c["optimizer"].update(learning_rate=0),
                        "config error: optimizer.learning_rate: must be > 0, got 0.0"),
    "LoRA rank 0": (lambda c: c["model"]["lora"].update(rank=0), "config error: model.lora.rank: must be >= 1, got 0"),
    "unknown objective": (lambda c: c.update(objective="dpoo"), "config error: objective.name: unknown objective"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_configs_one_line(name, tmp_path, capsys, pickapic_dir):
    mutate, expected = CONFIG_CASES[name]
    cfg = base_config(tmp_path / "m", pickapic_dir, tmp_path / "o")
    mutate(cfg)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
    record("config", name, f"exit 2, one line: `{err.replace('diffalign: ', '')}`")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(
    st.sampled_from(["max_steps", "batch_size", "mixed_precision", "seed", "weighting", "checkpoint_every",
                     "log_every", "share_noise", "bogus"]),
    st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(), st.none()),
    max_size=4))
def test_fuzzed_configs_never_crash_with_anything_but_config_error(extra):
    cfg = base_config("m", "d", "o")
    cfg.update(extra)
    try:
        parse_config(cfg)
    except ConfigError as err:
        assert "\n" not in str(err)


def test_lora_for_wrong_base_model(tiny_sd15_dir, tiny_sdxl_dir, tmp_path, capsys):
    from diffalign.models import add_lora, load_components, save_lora

    xl = load_components(tiny_sdxl_dir)
    add_lora(xl.unet, rank=4, init=False)
    save_lora(xl.unet, tmp_path / "xl-lora", sdxl=True)
    code = main(["generate", "--model", tiny_sd15_dir, "--lora", str(tmp_path / "xl-lora"), "--prompt", "x",
                 "--out", str(tmp_path / "o"), "--steps", "1"])
    ours = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("diffalign")]  # not progress bars
    assert code == 2 and len(ours) == 1 and "does not match" in ours[0]
    err = ours[0].replace("diffalign: ", "").replace(str(tmp_path), "...")
    record("LoRA", "adapter trained for another base model (SDXL LoRA on SD1.5)", f"exit 2, one line: `{err[:150]}`")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARK']}",))


def test_malicious_pickle_in_checkpoint_never_runs(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    state = {"step": 1, "evil": _Evil()}
    ckpt.save_checkpoint(tmp_path / "ck", 1, {"trainable.w": torch.zeros(2)}, {"step": 1}, None)
    path = tmp_path / "ck" / "checkpoint-1"
    with open(path / "state.pt", "wb") as f:
        pickle.dump(state, f)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_checkpoint(path)
    assert not mark.exists()
    assert not ckpt.is_complete(path)  # the checksum manifest no longer matches: never picked for --resume
    record("weights", "checkpoint whose state.pt holds a malicious pickle",
           "refused (`torch.load(weights_only=True)` raises UnpicklingError, nothing runs); its checksum no longer "
           "matches, so `--resume` skips it")


def test_half_written_checkpoint_is_ignored(tmp_path):
    ckpt.save_checkpoint(tmp_path / "ck", 2, {"w": torch.ones(2)}, {"step": 2}, None)
    (tmp_path / "ck" / "checkpoint-4.partial").mkdir()
    (tmp_path / "ck" / "checkpoint-6").mkdir()  # no manifest: a copy interrupted by the user
    assert ckpt.latest_checkpoint(tmp_path / "ck").name == "checkpoint-2"
    record("checkpoint", "half-written (`.partial`) or manifest-less checkpoint folder",
           "ignored; `--resume` takes the newest checkpoint whose checksums verify")


def test_run_refuses_to_overwrite_another_run(tiny_sd15_dir, pickapic_dir, tmp_path, capsys):
    out = tmp_path / "o"
    ckpt.save_checkpoint(out / "checkpoints", 5, {"w": torch.ones(1)}, {"step": 5}, None)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base_config(tiny_sd15_dir, pickapic_dir, out)))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    record("disk", "output_dir holds another run's checkpoints", f"exit 2, one line: `{err.split(': ', 2)[-1][:200]}`")


def _write_config(tmp_path, model, data, out, name="c.yaml", **kw):
    (tmp_path / name).write_text(yaml.safe_dump(base_config(model, data, out, **kw)))
    return str(tmp_path / name)


def _one_line(capsys):
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("diffalign")]  # not progress bars
    assert len(err) == 1, err
    return err[0].replace("diffalign: ", "")


def test_no_readable_pair_stops_at_once_naming_the_file(tiny_sd15_dir, tmp_path, capsys):
    import time

    d = tmp_path / "m"
    d.mkdir()
    (d / "m.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "chosen": f"gone_{i}.png",
                                                     "rejected": f"gone_{i}b.png"}) for i in range(3)))
    cfg = _write_config(tmp_path, tiny_sd15_dir, d / "m.jsonl", tmp_path / "o", max_steps=50)
    start = time.time()
    assert main(["train", cfg]) == 1
    err = _one_line(capsys)
    assert "none of the 3 pairs read so far could be decoded" in err and "gone_0.png" in err
    assert time.time() - start < 60
    record("dataset", "no image of the manifest can be read (every path wrong)",
           f"exit 1 within seconds, one line: `{err.replace(str(tmp_path), '...')[:170]}`")


def test_mostly_unreadable_data_stops_below_the_readable_share(tiny_sd15_dir, tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    rows = []
    for i in range(80):
        if i % 4 == 0:
            (d / f"{i}_w.png").write_bytes(png_bytes((200, 0, 0)))
            (d / f"{i}_l.png").write_bytes(png_bytes((0, 0, 200)))
        rows.append({"prompt": f"p{i}", "chosen": f"{i}_w.png", "rejected": f"{i}_l.png"})
    (d / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _write_config(tmp_path, tiny_sd15_dir, d / "m.jsonl", tmp_path / "o", max_steps=50, batch_size=8)
    assert main(["train", cfg]) == 1
    err = _one_line(capsys)
    assert "below dataset.min_readable_fraction=0.5" in err
    record("dataset", "3 of 4 pairs unreadable", f"exit 1 after 64 pairs, one line: `{err.replace(str(tmp_path), '...')[:150]}...`; "
           "`dataset.min_readable_fraction` sets the share")


def test_skips_are_counted_once_per_pair_with_names(tiny_sd15_dir, tmp_path, capsys):
    path = manifest_with(tmp_path, None)  # pair 1's loser is missing; 3 steps of 2 = two passes over the data
    out = tmp_path / "o"
    assert main(["train", _write_config(tmp_path, tiny_sd15_dir, path, out, max_steps=3, checkpoint_every=None,
                                        **{"dataset.min_readable_fraction": 0.0})]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unreadable_pairs"] == 1 and summary["skipped_samples"] >= 2
    assert summary["unreadable"][0]["index"] == 1 and "1_l.png" in summary["unreadable"][0]["reason"]
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "skipped" in ln)
    assert "skipped 1 unreadable pair (" in line
    record("dataset", "one unreadable pair met in several epochs", f"counted once: `{line.split(': ', 1)[1][:60]}...` "
           "and `unreadable_pairs` / `unreadable` (index, reason) in summary.json")


def test_empty_manifest_is_one_line(tiny_sd15_dir, tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text("")
    assert main(["train", _write_config(tmp_path, tiny_sd15_dir, tmp_path / "m.jsonl", tmp_path / "o")]) == 2
    err = _one_line(capsys)
    assert "is empty" in err
    record("dataset", "empty manifest", f"exit 2, one line: `{err.replace(str(tmp_path), '...')}`")


def test_torchrun_without_a_backend_never_trains_two_copies(tiny_sd15_dir, pickapic_dir, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets; accelerate sets up 1 on CPU
    assert main(["train", _write_config(tmp_path, tiny_sd15_dir, pickapic_dir, tmp_path / "o")]) == 2
    err = _one_line(capsys)
    assert "ACCELERATE_USE_CPU=1 torchrun" in err and not (tmp_path / "o" / "summary.json").exists()
    record("launch", "`torchrun --nproc_per_node 2` without a distributed backend (CPU)",
           f"exit 2, one line: `{err[:200]}...`")


def test_sharded_launch_and_unet_only_objective_on_a_flow_model_are_one_line(pickapic_dir, tmp_path, capsys,
                                                                            monkeypatch):
    import accelerate
    from accelerate.utils import DistributedType
    from fixtures.tiny_flow import save_tiny_flow_pipeline

    sd3 = save_tiny_flow_pipeline(tmp_path / "sd3", "sd3")
    assert main(["train", _write_config(tmp_path, sd3, pickapic_dir, tmp_path / "o", objective="inpo")]) == 2
    err = _one_line(capsys)
    assert "inpo does not run on sd3" in err and not (tmp_path / "o" / "summary.json").exists()
    record("model", "`objective: inpo` (or `ppd`) on an SD3/FLUX model", f"exit 2, one line: `{err}`")

    class Sharded(accelerate.Accelerator):  # what an FSDP config gives accelerate on GPUs
        @property
        def distributed_type(self):
            return DistributedType.FSDP

    monkeypatch.setattr(accelerate, "Accelerator", Sharded)
    assert main(["train", _write_config(tmp_path, sd3, pickapic_dir, tmp_path / "o2", name="d.yaml")]) == 2
    err = _one_line(capsys)
    assert "FSDP is not supported yet" in err and not (tmp_path / "o2" / "summary.json").exists()
    record("launch", "an FSDP or DeepSpeed accelerate config", f"exit 2, one line: `{err[:160]}...`")


def test_resume_never_moves_a_run_backwards(tiny_sd15_dir, pickapic_dir, tmp_path, capsys):
    out = tmp_path / "o"
    cfg = _write_config(tmp_path, tiny_sd15_dir, pickapic_dir, out, max_steps=4, checkpoint_every=2)
    assert main(["train", cfg]) == 0
    lora, metrics = (out / "pytorch_lora_weights.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", cfg, "--resume", "max_steps=1"]) == 2  # flags and overrides in any order
    err = _one_line(capsys)
    assert "past max_steps=1" in err
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == lora and (out / "metrics.jsonl").read_text() == metrics
    record("resume", "`--resume max_steps=1` on a run checkpointed at step 2",
           f"exit 2, LoRA and metrics untouched, one line: `{err}`")


def test_a_finished_run_is_not_overwritten_silently(tiny_sd15_dir, pickapic_dir, tmp_path, capsys):
    out = tmp_path / "o"
    cfg = _write_config(tmp_path, tiny_sd15_dir, pickapic_dir, out, max_steps=2, checkpoint_every=None)
    assert main(["train", cfg]) == 0
    lora = (out / "pytorch_lora_weights.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", cfg]) == 2
    err = _one_line(capsys)
    assert "finished run" in err and (out / "pytorch_lora_weights.safetensors").read_bytes() == lora
    assert main(["train", "--overwrite", cfg]) == 0
    record("disk", "output_dir holds a finished run (no checkpoints)", f"exit 2, one line: `{err.split(': ', 1)[-1].replace(str(tmp_path), '...')}`; "
           "`--overwrite` replaces it")


def test_resume_after_changing_the_lora_rank_is_one_line(tiny_sd15_dir, pickapic_dir, tmp_path, capsys):
    out = tmp_path / "o"
    cfg = _write_config(tmp_path, tiny_sd15_dir, pickapic_dir, out, max_steps=4, checkpoint_every=2)
    assert main(["train", cfg]) == 0
    capsys.readouterr()
    assert main(["train", cfg, "model.lora.rank=8", "--resume"]) == 2
    err = _one_line(capsys)
    assert "another model or LoRA setting" in err and "(4, " in err and "(8, " in err
    assert (out / "checkpoints" / "checkpoint-2").is_dir()  # a failed resume deletes nothing
    record("resume", "`--resume` after changing `model.lora.rank`", f"exit 2, one line: `{err.replace(str(tmp_path), '...')[:200]}`")


def test_train_without_a_config_says_so(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "a config file is required" in err and "overrides" not in err.split("error:")[1]
    record("command line", "`diffalign train` with no argument", "exit 2: the usage line and `a config file is required`")


def test_minimal_config_trains_at_the_models_native_size(tmp_path):
    from diffalign.toy import toy_model_path, toy_pairs_path
    from diffalign.training.trainer import PreferenceTrainer

    cfg = parse_config({"model": str(toy_model_path()), "dataset": str(toy_pairs_path()), "objective": "dpo",
                        "output_dir": str(tmp_path / "o"), "max_steps": 1, "report_to": None})
    assert cfg.dataset.resolution is None
    tr = PreferenceTrainer(cfg).setup()
    assert tr.config.dataset.resolution == 32  # assets/toy-sd: U-Net sample_size 8 x VAE factor 4
    tr.cleanup()
    record("config", "README's minimal config on `assets/toy-sd` (no `dataset.resolution`)",
           "trains at the model's native size, 32 px (SD1.5: 512, SDXL: 1024); the setup line prints it")


def test_missing_model_folder_says_not_found_and_hub_ids_say_hf_download(pickapic_dir, tmp_path, capsys,
                                                                         monkeypatch):
    assert main(["train", _write_config(tmp_path, tmp_path / "no-such-model", pickapic_dir, tmp_path / "o")]) == 2
    err = _one_line(capsys)
    assert err.endswith("not found") and "download" not in err
    record("model", "local model folder that does not exist", f"exit 2, one line: `{err.replace(str(tmp_path), '...')}`")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", _write_config(tmp_path, "someone/no-such-model", pickapic_dir, tmp_path / "o2")]) == 2
    err = _one_line(capsys)
    assert "`hf download someone/no-such-model`" in err
    record("model", "hub id, offline and not cached", f"exit 2, one line: `{err[:120]}...{err[err.index('(offline'):]}`")


def test_partly_matching_or_empty_lora_is_one_line(tiny_sd15_dir, tmp_path, capsys):
    """A LoRA whose layers exist with the right inputs but other outputs, and a file with no U-Net layers, are
    refused before diffusers half-loads them with a page of warnings."""
    from safetensors.torch import load_file, save_file

    from diffalign.models import add_lora, load_components, save_lora

    sd = load_components(tiny_sd15_dir)
    add_lora(sd.unet, rank=4, init=False)
    save_lora(sd.unet, tmp_path / "good", sdxl=False)
    weights = load_file(str(tmp_path / "good" / "pytorch_lora_weights.safetensors"))
    key = next(k for k in weights if k.endswith("to_out.0.lora_B.weight"))
    weights[key] = torch.zeros(weights[key].shape[0] + 8, weights[key].shape[1])  # out_features no longer match
    (tmp_path / "partly").mkdir()
    save_file(weights, str(tmp_path / "partly" / "pytorch_lora_weights.safetensors"))
    (tmp_path / "empty").mkdir()
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "empty" / "pytorch_lora_weights.safetensors"))
    for name, expected in (("partly", "1 of "), ("empty", "holds no U-Net LoRA layers")):
        code = main(["generate", "--model", tiny_sd15_dir, "--lora", str(tmp_path / name), "--prompt", "x",
                     "--out", str(tmp_path / "o"), "--steps", "1"])
        err = _one_line(capsys).replace(str(tmp_path), "...")
        assert code == 2 and expected in err and "out_features" in err if name == "partly" else expected in err
        record("LoRA", {"partly": "adapter whose layers partly match (one layer's output size differs)",
                        "empty": "file with no U-Net LoRA layers"}[name], f"exit 2, one line: `{err[:170]}`")


def test_demo_pictures_are_labelled_and_threads_are_set(tmp_path, monkeypatch):
    import torch as _torch

    from diffalign.toy import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, seed, max_steps, **kw: seen.update(
        threads=_torch.get_num_threads()))
    before = _torch.get_num_threads()
    try:
        demo.main(["--threads", "1"])
        assert seen["threads"] == 1
    finally:
        _torch.set_num_threads(before)
    history = [{"step": i + 1, "loss": 0.7 + 0.01 * i, "rewards/margins": 0.1 * i} for i in range(30)]
    demo._plot_curves(history, tmp_path / "curves.png")
    images = [Image.new("RGB", (32, 32), (200, 0, 0))] * 2
    demo._plot_samples(images, images, ["a red circle", "a blue square"], [1.0, 1.1], [1.2, 1.0],
                       tmp_path / "samples.png")
    assert Image.open(tmp_path / "samples.png").size[0] > 200 and (tmp_path / "curves.png").stat().st_size > 0
    record("demo", "`samples.png`, `curves.png`, thread count",
           "samples: `base` / `aligned` row names, the prompt under each column, each image's oracle reward; curves: "
           "legend with the ln 2 line (the loss at step 0) and why the loss stays above it; `--threads` (default 1) "
           "sets torch's threads")


def test_eval_errors_are_one_line_and_the_toy_oracle_is_a_metric(tmp_path, capsys):
    from diffalign.toy.shapes import ShapeSpec, render

    def eval_line(*argv):
        code = main(["eval", *argv, "--out", str(tmp_path / "o")])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("diffalign")]
        assert code == 2 and len(err) == 1, err
        return err[0].replace(str(tmp_path), "...")

    err = eval_line("--images", str(tmp_path / "nofolder"), "--metric", "aesthetic")
    assert "no such folder" in err
    record("eval", "`--images` folder that does not exist", f"exit 2, one line: `{err}`")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    spec = ShapeSpec("red", "circle", "blue", 11.5, 16.0, 16.0)
    render(spec).save(imgs / "0.png")
    (tmp_path / "p.txt").write_text(spec.caption + "\n")
    (tmp_path / "empty").mkdir()
    err = eval_line("--images", str(imgs), "--prompts", str(tmp_path / "p.txt"), "--metric",
                    f"clip={tmp_path / 'empty'}")
    assert "cannot load the clip scorer" in err
    record("eval", "`--metric clip=<a folder without CLIP weights>`", f"exit 2, one line: `{err[:160]}...`")
    assert main(["eval", "--images", str(imgs), "--prompts", str(tmp_path / "p.txt"), "--metric", "toy",
                 "--out", str(tmp_path / "toy")]) == 0
    html = (tmp_path / "toy" / "report.html").read_text()
    assert "data:image/png;base64," in html and "src='images/" not in html
    record("eval", "an offline metric that means something; moving the HTML report",
           "`--metric toy` scores toy-world images with the demo's oracle, no weights needed; `report.html` "
           "embeds its images and charts (it still shows everything after being moved)")


def test_every_config_key_has_a_reference_and_lora_loads_quietly(tiny_sd15_dir, tmp_path, capfd):
    from diffalign.models import add_lora, load_components, save_lora

    reference = (DOC.parent / "config.md").read_text()
    assert "`dataset.resolution`" in reference and "`objective.loser_caption`" in reference
    record("config", "which keys exist, their types and defaults",
           "`docs/config.md`: every key of every section and objective with type, default and help, generated from "
           "the dataclasses (`tests/core/test_config_reference.py` fails when it is stale)")
    sd = load_components(tiny_sd15_dir)
    add_lora(sd.unet, rank=4, init=False)
    save_lora(sd.unet, tmp_path / "lora", sdxl=False)
    capfd.readouterr()
    assert main(["generate", "--model", tiny_sd15_dir, "--lora", str(tmp_path / "lora"), "--prompt", "x",
                 "--out", str(tmp_path / "o"), "--steps", "1"]) == 0
    out = capfd.readouterr()
    assert "No LoRA keys associated" not in out.err + out.out
    record("LoRA", "loading a diffalign LoRA (`generate`, `eval`, the demo)",
           "no \"No LoRA keys associated to CLIPTextModel\" warning (the adapters hold U-Net layers only)")


def test_write_table():
    """Runs last in this module: writes the table of everything recorded above (only after a full run)."""
    if len(ROWS) < 24:
        pytest.skip("only a subset of the bad-input tests ran; the table is written after a full run")
    lines = ["# What users see on bad input", "",
             "Generated by `tests/reliability/test_bad_inputs.py` (do not edit by hand). Every row is a test.", "",
             "| category | input | what the user sees |", "| --- | --- | --- |"]
    lines += [f"| {c} | {w} | {s} |" for c, w, s in ROWS]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")
