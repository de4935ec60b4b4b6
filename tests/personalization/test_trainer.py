"""The PPD recipe on a tiny SD1.x model: ln 2 at step 0, the reference never sees the user, only the branch trains,
user features are cached, the saved branch reloads to the same outputs."""

import math

import pytest
import torch

from diffalign.data import collate_pairs
from diffalign.personalization import USER_BRANCH_NAME, USER_EMBEDDINGS_NAME, load_user_branch, load_user_embeddings
from diffalign.personalization.io import branch_parameters
from diffalign.personalization.trainer import PersonalizedTrainer
from diffalign.training.config import ConfigError
from diffalign.training.trainer import trainer_class


def first_batch(tr, n=4):
    loader = torch.utils.data.DataLoader(tr.dataset, batch_size=n, collate_fn=collate_pairs)
    return next(iter(loader))


def test_branch_only_run(tiny_sd15_dir, user_pairs_dir, tmp_path, ppd_config):
    kw = {"model.lora": None, "max_steps": 3, "checkpoint_every": None, "dataset.random_flip": False}
    with pytest.raises(ConfigError, match="objective.user_dropout: 0.1 with model.lora null: only the user branch"):
        PersonalizedTrainer(ppd_config(tiny_sd15_dir, user_pairs_dir, tmp_path / "run", objective={
            "user_dropout": 0.1}, **kw)).setup()
    cfg = ppd_config(tiny_sd15_dir, user_pairs_dir, tmp_path / "run", **kw)
    assert trainer_class(cfg) is PersonalizedTrainer
    tr = PersonalizedTrainer(cfg).setup()
    assert tr.user_dropout == 0.0  # branch only: a dropped pair would be policy = reference (ln 2, no gradient)
    unet = tr.accelerator.unwrap_model(tr.unet)

    # users and their few-shot sets: every support pair belongs to its user
    assert set(tr.support) == {"alice", "bob", "carol"}
    for user, sets in tr.support.items():
        assert len(sets) == 1 and len(sets[0]) == 2 and all(tr.user_of[i] == user for i in sets[0])
    assert {k: tuple(v.shape) for k, v in tr.user_features.items()} == {u: (1, 2, 16) for u in tr.support}

    # step 0: the branch is a no-op, so policy == reference and the loss is exactly ln 2
    batch = first_batch(tr)
    with torch.no_grad():
        out = tr.compute_loss(batch)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert out.metrics["errors/policy_w"] == out.metrics["errors/ref_w"]

    # one policy call with the pair's user, one reference call without any user
    seen, tokens = [], []

    def record(module, args, kwargs):
        u = (kwargs.get("cross_attention_kwargs") or {}).get("user_tokens")
        seen.append((torch.is_grad_enabled(), u is not None))
        if u is not None:
            tokens.append(u.detach().clone())

    unet.register_forward_pre_hook(record, with_kwargs=True)
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    branch = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    assert branch and all(".processor." in n or n.startswith("user_projection.") for n in branch)
    tr.train()
    assert seen == [(True, True), (False, False)] * 3
    assert [h["users/dropped"] for h in tr.history] == [0.0] * 3
    for u in tokens:  # winner and loser of a pair carry the same (labelling) user's tokens, and they are not zero
        b = u.shape[0] // 2
        assert torch.equal(u[:b], u[b:]) and torch.count_nonzero(u) > 0
    params = dict(unet.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in base.items())  # the base U-Net is frozen
    moved = [n for n, v in branch.items() if not torch.equal(params[n], v)]
    # W'_k gets no gradient while W'_v is still 0 after one step, so check the ones that must move from step 1
    assert any("to_v_u" in n for n in moved) and any(n.startswith("user_projection.") for n in moved)
    assert (tmp_path / "run" / USER_BRANCH_NAME).exists() and (tmp_path / "run" / USER_EMBEDDINGS_NAME).exists()
    assert not (tmp_path / "run" / "unet").exists()  # branch-only: no U-Net copy is saved

    # the saved branch on a fresh U-Net gives the trained model's predictions, with and without a user
    from diffalign.models import load_components

    fresh = load_components(tiny_sd15_dir).unet.eval()
    spec = load_user_branch(fresh, tmp_path / "run")
    assert spec.num_tokens == 4 and spec.token_dim == 32 and spec.encoder.model == "tiny"
    feats, _ = load_user_embeddings(tmp_path / "run")
    unet.eval()
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn((1, 4, 16, 16), generator=g), torch.tensor([300]), torch.randn((1, 16, 32), generator=g)
    with torch.no_grad():
        u = unet.user_projection(feats["alice"][0:1])
        assert torch.equal(fresh.user_projection(feats["alice"][0:1]), u)
        want = unet(x, t, text, cross_attention_kwargs={"user_tokens": u}).sample
        got = fresh(x, t, text, cross_attention_kwargs={"user_tokens": u}).sample
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert torch.equal(fresh(x, t, text).sample, load_components(tiny_sd15_dir).unet.eval()(x, t, text).sample)
    tr.cleanup()


def test_lora_and_branch_train_and_dropout(tiny_sd15_dir, user_pairs_dir, tmp_path, ppd_config):
    assert PersonalizedTrainer(ppd_config(tiny_sd15_dir, user_pairs_dir, tmp_path / "d"))._user_dropout() == 0.1
    cfg = ppd_config(tiny_sd15_dir, user_pairs_dir, tmp_path / "run",
                     objective={"user_dropout": 0.5, "example_sets": 2, "init": "zero_gate"},
                     **{"max_steps": 2, "checkpoint_every": None})
    tr = PersonalizedTrainer(cfg).setup()
    assert all(v.shape[0] == 2 for v in tr.user_features.values())  # K = 2 few-shot sets per user
    unet = tr.accelerator.unwrap_model(tr.unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in before) and any("gate" in n for n in before)
    tr.train()
    params = dict(unet.named_parameters())
    moved = {n for n, v in before.items() if not torch.equal(params[n], v)}
    assert any("lora_B" in n for n in moved) and any(n.endswith(".gate") for n in moved)
    assert 0.0 <= tr.history[-1]["users/dropped"] <= 1.0
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()

    # dropped users get exactly zero tokens
    tr.user_dropout = 1.0  # (the config allows < 1; set directly to force it)
    tokens = tr.batch_user_tokens(first_batch(tr))
    assert torch.count_nonzero(tokens) == 0
    tr.cleanup()

    # a rerun in the same output_dir reuses the cached user features
    cfg2 = ppd_config(tiny_sd15_dir, user_pairs_dir, tmp_path / "run",
                      objective={"user_dropout": 0.5, "example_sets": 2, "init": "zero_gate"},
                      **{"max_steps": 2, "checkpoint_every": None})
    tr2 = PersonalizedTrainer(cfg2)
    tr2._encode_users = lambda: pytest.fail("features should come from the cache")
    tr2.setup(overwrite=True)
    tr2.cleanup()


def test_missing_user_column_is_a_config_error(tiny_sd15_dir, pickapic_dir, tmp_path, ppd_config):
    cfg = ppd_config(tiny_sd15_dir, pickapic_dir, tmp_path / "run")
    with pytest.raises(ConfigError, match="objective.user_column: the dataset has no column 'user_id'"):
        PersonalizedTrainer(cfg).setup()


@pytest.mark.parametrize("lora", [None, {"rank": 4}], ids=["branch-only", "lora"])
def test_ema_trains_and_exports_and_one_parameter_list_serves_all(lora, tiny_sd15_dir, user_pairs_dir, tmp_path,
                                                                   ppd_config, capsys):
    """objective ppd with ema_decay: the optimizer, EMA and the setup log count the same parameters (branch
    included); the exported branch is the EMA's; branch-only training keeps no second U-Net."""
    from safetensors.torch import load_file

    from diffalign.models import FrozenCopyReference

    cfg = ppd_config(tiny_sd15_dir, user_pairs_dir, tmp_path / "run", ema_decay=0.5,
                     **{"model.lora": lora, "max_steps": 2, "checkpoint_every": None})
    tr = PersonalizedTrainer(cfg).setup()
    held = [q for group in tr.optimizer.param_groups for q in group["params"]]
    assert [id(q) for q in held] == [id(q) for q in tr.trainable_parameters()]
    assert len(tr.ema.shadow_params) == len(held)
    n = sum(q.numel() for q in held)
    assert f"{n:,} trainable params" in capsys.readouterr().out
    assert not isinstance(tr.reference.inner, FrozenCopyReference)
    assert tr.reference.inner.unet is tr.components.unet  # the reference is a view of the policy's U-Net
    tr.train()
    shadow = [t.clone() for t in tr.ema.shadow_params]
    tr.cleanup()
    saved = load_file(str(tmp_path / "run" / USER_BRANCH_NAME))
    branch = {id(q): q for q in branch_parameters(tr.components.unet)}
    exported = {q.data_ptr() for q in branch.values()}
    assert len(saved) and exported  # the export wrote the branch ...
    ema_branch = shadow[-len(branch):]  # ... holding the EMA weights (the branch comes last in the list)
    assert all(torch.equal(a, b) for a, b in zip(ema_branch, branch.values()))
