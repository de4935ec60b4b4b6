"""ImageReward against a line-by-line re-derivation of the official forward (THUDM/ImageReward @c1392c6:
``ImageReward.score``, ``models/BLIP/vit.py`` ``VisionTransformer.forward``/``Block``/``Attention``,
``models/BLIP/med.py`` ``BertModel`` in "multimodal" mode), in plain torch on the *official* state-dict names --
no transformers BLIP code. (The recorded scores of the real package are checked in ``test_official_scorer_fixtures.py``.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from diffalign.evaluators import load
from diffalign.evaluators.imagereward import convert_state_dict

MEAN, STD = 0.16717362830052426, 1.0333394966054072

official_transform = Compose(  # ImageReward._transform(224) (images converted to RGB first: see _transforms)
    [
        Resize(224, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(224),
        lambda im: im.convert("RGB"),
        ToTensor(),
        Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ]
)


def blip_vit(sd, x, num_heads):
    """vit.py: patch_embed -> [cls] + pos_embed -> pre-norm blocks (LN eps 1e-6, exact GELU) -> norm."""
    p = "blip.visual_encoder."
    w = sd[p + "patch_embed.proj.weight"]
    x = (
        F.conv2d(x, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    )  # (B, N, C)
    B, _, C = x.shape
    x = torch.cat([sd[p + "cls_token"].expand(B, -1, -1), x], dim=1)
    x = x + sd[p + "pos_embed"][:, : x.size(1), :]
    N = x.shape[1]
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(p + "blocks."))
    for i in range(depth):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (C,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (C // num_heads) ** -0.5).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(h, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (C,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
            sd[b + "mlp.fc2.weight"],
            sd[b + "mlp.fc2.bias"],
        )
        x = x + h
    return F.layer_norm(x, (C,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)


def med_bert(sd, cfg, input_ids, attention_mask, image_embeds):
    """med.py BertModel(add_pooling_layer=False) forward, mode='multimodal', is_decoder=False."""
    p = "blip.text_encoder."
    H, nh, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    hd = H // nh
    L = input_ids.shape[1]
    x = F.embedding(input_ids, sd[p + "embeddings.word_embeddings.weight"])
    x = x + sd[p + "embeddings.position_embeddings.weight"][:L][None]
    x = F.layer_norm(
        x, (H,), sd[p + "embeddings.LayerNorm.weight"], sd[p + "embeddings.LayerNorm.bias"], eps=eps
    )
    ext_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # get_extended_attention_mask
    enc_mask = (
        1.0 - torch.ones(image_embeds.shape[:2])[:, None, None, :]
    ) * -10000.0  # invert_attention_mask

    def attention(prefix, h, kv, mask):
        B = h.shape[0]

        def split(t):
            return t.view(B, -1, nh, hd).permute(0, 2, 1, 3)

        q = split(F.linear(h, sd[prefix + "self.query.weight"], sd[prefix + "self.query.bias"]))
        k = split(F.linear(kv, sd[prefix + "self.key.weight"], sd[prefix + "self.key.bias"]))
        v = split(F.linear(kv, sd[prefix + "self.value.weight"], sd[prefix + "self.value.bias"]))
        scores = q @ k.transpose(-1, -2) / hd**0.5 + mask
        ctx = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(B, -1, H)
        out = F.linear(ctx, sd[prefix + "output.dense.weight"], sd[prefix + "output.dense.bias"])
        return F.layer_norm(
            out + h,
            (H,),
            sd[prefix + "output.LayerNorm.weight"],
            sd[prefix + "output.LayerNorm.bias"],
            eps=eps,
        )

    for i in range(cfg["num_hidden_layers"]):
        b = f"{p}encoder.layer.{i}."
        x = attention(b + "attention.", x, x, ext_mask)
        x = attention(b + "crossattention.", x, image_embeds, enc_mask)
        h = F.gelu(F.linear(x, sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"]))
        h = F.linear(h, sd[b + "output.dense.weight"], sd[b + "output.dense.bias"])
        x = F.layer_norm(
            h + x, (H,), sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"], eps=eps
        )
    return x


def mlp(sd, x):
    """ImageReward.MLP: five Linear layers, no activations (dropouts inactive in eval)."""
    for i in (0, 2, 4, 6, 7):
        x = F.linear(x, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return x


@pytest.fixture(scope="module")
def official_state(tiny_dirs):
    d = tiny_dirs["imagereward"]
    return torch.load(d / "ImageReward.pt", map_location="cpu", weights_only=True), json.loads(
        (d / "med_config.json").read_text()
    )


def test_scores_match_official_forward(tiny_dirs, official_state, cases):
    from transformers import BertTokenizer

    sd, cfg = official_state
    images, prompts = cases
    tokenizer = BertTokenizer(str(tiny_dirs["imagereward"] / "vocab.txt"))  # init_tokenizer(), local vocab
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    num_heads = sd["blip.visual_encoder.cls_token"].shape[-1] // 64
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            text_input = tokenizer(
                prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
            )
            # RGB first (documented deviation: the official transform converts after resizing, which treats RGBA
            # with premultiplied alpha)
            image_embeds = blip_vit(sd, official_transform(image.convert("RGB")).unsqueeze(0), num_heads)
            text_output = med_bert(sd, cfg, text_input.input_ids, text_input.attention_mask, image_embeds)
            rewards = mlp(sd, text_output[:, 0, :].float())
            expected.append(((rewards - MEAN) / STD)[0, 0])
    expected = torch.stack(expected)
    scorer = load("imagereward", weights=str(tiny_dirs["imagereward"]))
    torch.testing.assert_close(scorer.score(images, prompts, batch_size=4), expected, atol=1e-4, rtol=0)
    assert expected.std() > 1e-2


def test_key_mapping_drops_only_unused_keys(official_state):
    sd, _ = official_state
    converted = convert_state_dict(sd)
    dropped = (
        set(sd)
        - {k for k in sd if k.startswith("mlp.")}
        - {
            "blip.text_encoder." + k[len("text_encoder.") :]
            for k in converted
            if k.startswith("text_encoder.")
        }
    )
    dropped = {k for k in dropped if not k.startswith("blip.visual_encoder.")}
    assert dropped == {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
    vision = [k for k in sd if k.startswith("blip.visual_encoder.")]
    assert len([k for k in converted if k.startswith("vision_model.")]) == len(vision)
    assert converted["vision_model.embeddings.class_embedding"] is sd["blip.visual_encoder.cls_token"]
    assert (
        converted["vision_model.encoder.layers.1.self_attn.projection.weight"]
        is sd["blip.visual_encoder.blocks.1.attn.proj.weight"]
    )
    with pytest.raises(KeyError, match="blip.visual_encoder.head.weight"):
        convert_state_dict({**sd, "blip.visual_encoder.head.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="itm_head"):
        convert_state_dict({**sd, "blip.itm_head.weight": torch.zeros(1)})
