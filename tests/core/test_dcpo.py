import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from diffalign.data.captions import WordSwap, caption_rng
from diffalign.objectives import PairErrors, build_objective
from fixtures.data import base_config
from diffalign.training.config import ConfigError, parse_config
from diffalign.training.trainer import PreferenceTrainer


def test_dcpo_loss_by_hand():
    """β=500: inside = -250·[(0.10-0.11) - (0.12-0.11)] = 5 -> loss = log(1 + e^-5) = 0.0067153."""
    obj, spec = build_objective("dcpo")
    assert spec.dual_captions and spec.needs_reference
    d = torch.float64
    e = PairErrors(torch.tensor([0.10], dtype=d), torch.tensor([0.12], dtype=d),
                   torch.tensor([0.11], dtype=d), torch.tensor([0.11], dtype=d))
    assert obj(e).loss.item() == pytest.approx(math.log1p(math.exp(-5.0)), abs=1e-9)
    mw = e.model_w.clone().requires_grad_()
    obj(PairErrors(mw, e.model_l, e.ref_w, e.ref_l)).loss.backward()
    assert mw.grad.item() > 0


def test_word_swap_changes_same_class_words_deterministically():
    p = WordSwap(0.4, vocabulary=["dog", "tree"])
    c = "a red circle on a blue background"
    out1, out2 = p(c, random.Random(3)), p(c, random.Random(3))
    assert out1 == out2 and out1 != c
    words_in, words_out = c.split(), out1.split()
    assert len(words_in) == len(words_out)
    for a, b in zip(words_in, words_out):
        if a != b and a in ("red", "blue"):
            assert b in p.classes["colour"]
        if a != b and a == "circle":
            assert b in p.classes["shape"]
    strong = WordSwap(0.8, vocabulary=["dog"])
    changed = lambda q: sum(x != y for x, y in zip(c.split(), q(c, random.Random(0)).split()))
    assert changed(strong) >= changed(p)


CAPTIONS_OF_TWO_EPOCHS = """
import json, sys
from diffalign.data.captions import WordSwap, caption_vocabulary
from diffalign.data.pairs import DualCaptions, PreferencePairs
ds = PreferencePairs(sys.argv[1], seed=7)
ds.dual_captions = DualCaptions("word_swap", WordSwap(0.6, caption_vocabulary(ds.caption(i) for i in range(len(ds)))))
out = []
for epoch in (0, 1):
    ds.epoch = epoch
    out.append([ds[i]["caption_l"] for i in range(len(ds))])
print(json.dumps(out))
"""


def test_word_swap_captions_are_the_same_in_every_process(pickapic_dir):
    """Two interpreters with different str-hash salts (PYTHONHASHSEED) draw the same loser captions, and a new
    epoch draws new ones."""
    runs = []
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt}
        done = subprocess.run([sys.executable, "-c", CAPTIONS_OF_TWO_EPOCHS, str(pickapic_dir)], env=env,
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]


def test_word_swap_conditions_the_winner_on_the_prompt_and_the_loser_on_the_swap(pickapic_dir):
    from diffalign.data.pairs import DualCaptions, PreferencePairs

    ds = PreferencePairs(str(pickapic_dir), seed=3)
    ds.epoch = 2
    swap = WordSwap(0.6, vocabulary=["dog", "tree"])
    ds.dual_captions = DualCaptions("word_swap", swap)
    item = ds[1]
    assert item["caption"] == ds.caption(1)
    assert item["caption_l"] == swap(ds.caption(1), caption_rng(3, 2, 1)) != item["caption"]


def _record_loser_captions(trainer, seen):
    original = trainer.compute_loss

    def compute_loss(batch):
        seen.append((trainer.step, list(batch["captions_l"])))
        return original(batch)

    trainer.compute_loss = compute_loss


def test_resumed_run_continues_the_same_loser_captions(tiny_sd15_dir, pickapic_dir, tmp_path):
    """6 steps over 8 pairs (two epochs), interrupted after the step-2 checkpoint and resumed: every step sees the
    loser captions of the uninterrupted run."""
    kw = {"max_steps": 6, "checkpoint_every": 2,
          "objective": {"name": "dcpo", "loser_caption": "word_swap", "swap_fraction": 0.4}}
    make = lambda out: PreferenceTrainer(parse_config(base_config(tiny_sd15_dir, pickapic_dir, out, **kw)))
    full, full_seen = make(tmp_path / "full").setup(), []
    _record_loser_captions(full, full_seen)
    full.train()
    full.cleanup()

    crashing, seen = make(tmp_path / "crash").setup(), []
    _record_loser_captions(crashing, seen)
    original = crashing.compute_loss

    def crash_at_step_3(batch):
        if crashing.step == 3:
            raise KeyboardInterrupt
        return original(batch)

    crashing.compute_loss = crash_at_step_3
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    resumed = make(tmp_path / "crash").setup(resume=True)
    assert resumed.step == 2
    seen = [s for s in seen if s[0] < 2]
    _record_loser_captions(resumed, seen)
    resumed.train()
    resumed.cleanup()
    assert [s for _, s in full_seen] == [s for _, s in seen]
    assert len(full_seen) == 6 and full_seen[0][1] != full_seen[4][1]


def test_trainer_conditions_loser_on_its_own_caption(tiny_sd15_dir, pickapic_dir, tmp_path):
    cfg = parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=2,
                                   checkpoint_every=None, objective={"name": "dcpo", "loser_caption": "word_swap"}))
    tr = PreferenceTrainer(cfg).setup()
    seen, batches = [], []
    tr.accelerator.unwrap_model(tr.unet).register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((torch.is_grad_enabled(), kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True)
    _record_loser_captions(tr, batches)
    tr.train()
    assert [g for g, _ in seen] == [True, False, True, False]  # one policy + one reference call per step
    h = seen[0][1]  # (2B, L, D): winners under z_w, losers under z_l
    _, captions_l = batches[0]
    with torch.no_grad():
        assert torch.equal(h[2:], tr.encode_text(captions_l)["encoder_hidden_states"])  # the losers' half is their own (swapped) captions
    assert not torch.allclose(h[:2], h[2:])
    assert torch.equal(seen[0][1], seen[1][1])  # the reference sees the same dual captions
    tr.cleanup()


def test_column_mode_needs_caption_columns(tiny_sd15_dir, pickapic_dir, tmp_path):
    from diffalign.data import DatasetFormatError

    cfg = parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run", objective="dcpo"))
    assert cfg.objective.params.loser_caption == "column"  # the official code's source of captions
    with pytest.raises(DatasetFormatError, match="caption_chosen"):
        PreferenceTrainer(cfg).setup()
    cfg = parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run2", objective={
        "name": "dcpo", "caption_columns": ["caption", "caption_lesspreferred_perturbed_60"]}))
    with pytest.raises(DatasetFormatError, match="'caption_lesspreferred_perturbed_60' is not in the dataset"):
        PreferenceTrainer(cfg).setup()
    with pytest.raises(ConfigError, match="objective.loser_caption"):
        parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "r", objective={"name": "dcpo",
                                                                                        "loser_caption": "x"}))
    with pytest.raises(ConfigError, match="'perturb' is now 'word_swap'"):
        parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "r", objective={"name": "dcpo",
                                                                                        "loser_caption": "perturb"}))


def test_named_caption_columns_feed_winner_and_loser(tiny_sd15_dir, tmp_path):
    """Precomputed paraphrases (DCPO-p): z_w from the first named column, z_l from the second."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.data.pairs import DualCaptions, PreferencePairs
    from fixtures.data import write_pickapic_parquet

    src = write_pickapic_parquet(tmp_path / "data", n=4, tie_every=0)
    table = pq.read_table(src / "train.parquet")
    table = table.append_column("para", pa.array([f"paraphrase {i}" for i in range(4)]))
    pq.write_table(table, src / "train.parquet")
    ds = PreferencePairs(str(src))
    ds.dual_captions = DualCaptions("column", columns=("caption", "para"))
    assert [(ds[i]["caption"], ds[i]["caption_l"]) for i in range(4)] == [
        (f"a prompt number {i}", f"paraphrase {i}") for i in range(4)]
