"""Record what the *official* scorer packages output on diffalign's tiny weights, for ``test_official_scorer_fixtures.py``.

The official packages cannot live in diffalign's environment (pins: hpsv2 -> protobuf<4, pytest==7.2.0;
image-reward -> timm==0.6.13, fairscale, and transformers < 4.4x), so they run once in side venvs and their scores
are committed as ``tests/evaluators/data/official_scores.json``. Stages (run from the repository root):

    # 1. tiny weights, by the tests' builders (tests/fixtures/tiny_scorers.py; main environment)
    python tests/evaluators/official/make_official_fixtures.py weights /tmp/official
    # 2. side venv A (python -m venv --system-site-packages): torchmetrics==1.9.0, hpsv2==1.2.0 --no-deps, clint,
    #    plus open_clip's bpe_simple_vocab_16e6.txt.gz copied into hpsv2/src/open_clip/ (missing from the wheel)
    /tmp/ref-venv/bin/python tests/evaluators/official/make_official_fixtures.py torchmetrics /tmp/official
    /tmp/ref-venv/bin/python tests/evaluators/official/make_official_fixtures.py hps /tmp/official
    # 3. side venv B: transformers==4.38.2, huggingface_hub<0.24, tokenizers<0.19, image-reward==1.5 --no-deps
    /tmp/ref-ir/bin/python tests/evaluators/official/make_official_fixtures.py imagereward /tmp/official
    # 4. merge into the committed fixture (main environment)
    python tests/evaluators/official/make_official_fixtures.py merge /tmp/official

Every stage scores ``_evaluator_cases.pairs()`` (lists aligned with it) one image at a time through the official entry point. Images are converted to
RGB first (diffalign's documented deviation for RGBA input).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))  # tests/: the tiny builders are fixtures.tiny_scorers

import _evaluator_cases as _cases


def _case_list():
    images = _cases.make_images()
    return [(name, prompt, images[name].convert("RGB")) for name, prompt in _cases.pairs()]


def stage_weights(out: Path) -> None:
    from fixtures import tiny_scorers as tiny

    tiny.save_tiny_clip(out / "clip")
    tiny.save_tiny_hps(out / "hpsv2", "v2.0")
    tiny.save_tiny_imagereward(out / "imagereward")


def stage_torchmetrics(out: Path) -> dict:
    """torchmetrics 1.9.0 ``_clip_score_update`` (per-sample 100 cos) and ``clip_score`` (clamped mean), with the
    processor's PIL backend (transformers 4.x behaviour, which diffalign follows) and, for the record, the
    torchvision backend that transformers 5.x picks by default."""
    import numpy as np
    import torch
    import torchmetrics
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update, clip_score
    from transformers import CLIPModel, CLIPProcessor

    class Tensors(torch.nn.Module):
        """torchmetrics 1.9.0 calls ``.norm`` on ``get_*_features``' result, which transformers 5.x returns as a
        ``BaseModelOutputWithPooling``; this wrapper hands it the projected tensor (``.pooler_output``), as
        transformers 4.x did. Nothing else changes."""

        def __init__(self, clip):
            super().__init__()
            self.clip, self.config = clip, clip.config

        def get_image_features(self, *args, **kwargs):
            return self.clip.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.clip.get_text_features(*args, **kwargs).pooler_output

    model = Tensors(CLIPModel.from_pretrained(out / "clip", attn_implementation="eager").eval())
    result = {
        "package": f"torchmetrics=={torchmetrics.__version__}",
        "raw": [],
        "raw_torchvision_backend": [],
    }
    cases = _case_list()
    for backend, key in (("pil", "raw"), ("torchvision", "raw_torchvision_backend")):
        processor = CLIPProcessor.from_pretrained(out / "clip", backend=backend)
        with torch.no_grad():
            for name, prompt, image in cases:
                pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # uint8 (3, H, W)
                score, _ = _clip_score_update([pixels], [prompt], model, processor)
                result[key].append(float(score[0]))
            if backend == "pil":
                tensors = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for _, _, im in cases]
                result["corpus"] = float(
                    clip_score(
                        tensors,
                        [p for _, p, _ in cases],
                        model_name_or_path=lambda processor=processor: (model, processor),
                    )
                )
    return result


def stage_hps(out: Path) -> dict:
    """hpsv2 1.2.0 ``img_score.score(image, prompt, cp=...)``: the real function, with its model cache pre-filled by
    the official ``create_model_and_transforms`` on the tiny config (it would otherwise build ViT-H-14)."""
    import torch
    from hpsv2 import img_score
    from hpsv2.src import open_clip as hps_open_clip

    name = "tiny-hps"
    cfg_path = out / "hpsv2" / f"{name}.json"
    cfg_path.write_text((out / "hpsv2" / "open_clip_config.json").read_text())
    hps_open_clip.add_model_config(str(cfg_path))
    model, _, preprocess_val = hps_open_clip.create_model_and_transforms(
        name,
        None,
        precision="amp",
        device="cpu",
        jit=False,
        force_quick_gelu=False,
        force_custom_text=False,
        force_patch_dropout=False,
        force_image_size=None,
        pretrained_image=False,
        image_mean=None,
        image_std=None,
        light_augmentation=True,
        aug_cfg={},
        output_dict=True,
        with_score_predictor=False,
        with_region_predictor=False,
    )
    img_score.model_dict["model"] = model
    img_score.model_dict["preprocess_val"] = preprocess_val
    cp = str(out / "hpsv2" / "HPS_v2_compressed.pt")
    result = {"package": "hpsv2==1.2.0", "score": [], "pixels_sum": {}}
    for case_name, prompt, image in _case_list():
        result["score"].append(float(img_score.score(image, prompt, cp=cp)[0]))
        result["pixels_sum"][case_name] = float(preprocess_val(image).double().sum())
    result["tokens_long_prompt"] = hps_open_clip.get_tokenizer("ViT-H-14")([_cases.PROMPTS[2]])[0].tolist()
    del torch
    return result


def _import_official_imagereward():
    """Import ``ImageReward.ImageReward`` without the package ``__init__`` (which pulls ReFL: diffusers, datasets,
    openai-clip) and with a stub for fairscale's ``checkpoint_wrapper`` (only used for gradient checkpointing)."""
    import importlib.util

    fairscale = types.ModuleType("fairscale")
    for sub in ("fairscale.nn", "fairscale.nn.checkpoint", "fairscale.nn.checkpoint.checkpoint_activations"):
        sys.modules[sub] = types.ModuleType(sub)
    sys.modules["fairscale"] = fairscale
    sys.modules["fairscale.nn.checkpoint.checkpoint_activations"].checkpoint_wrapper = lambda module, **kw: (
        module
    )

    root = Path(importlib.util.find_spec("ImageReward").origin).parent
    for pkg, path in (("ImageReward", root), ("ImageReward.models", root / "models")):
        module = types.ModuleType(pkg)
        module.__path__ = [str(path)]
        sys.modules[pkg] = module
    import ImageReward.ImageReward as official
    from ImageReward.models.BLIP import blip as official_blip
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer

    return official, official_blip, BertConfig, BertModel, VisionTransformer


def stage_imagereward(out: Path) -> dict:
    """image-reward 1.5 ``ImageReward.score(prompt, image)``, the real method, on an instance whose ``blip`` holds
    the official ``VisionTransformer`` and MED ``BertModel`` built at tiny size, loaded *strictly* from the tiny
    checkpoint (proves diffalign's tiny file uses the official key names)."""
    import torch
    import transformers
    from torch import nn
    from transformers import BertTokenizer

    official, official_blip, BertConfig, BertModel, VisionTransformer = _import_official_imagereward()
    d = out / "imagereward"
    med = json.loads((d / "med_config.json").read_text())
    state = torch.load(d / "ImageReward.pt", map_location="cpu", weights_only=True)
    width = state["blip.visual_encoder.cls_token"].shape[-1]
    patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("blip.visual_encoder.blocks."))
    mlp_ratio = state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] / width

    blip = nn.Module()
    blip.visual_encoder = VisionTransformer(
        img_size=224,
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=width // 64,
        mlp_ratio=mlp_ratio,
    )
    # BLIP's init_tokenizer() with the local vocabulary instead of the hub's bert-base-uncased.
    original = BertTokenizer.from_pretrained
    BertTokenizer.from_pretrained = classmethod(lambda cls, *a, **k: original.__func__(cls, str(d)))
    blip.tokenizer = official_blip.init_tokenizer()
    BertTokenizer.from_pretrained = original
    config = BertConfig.from_json_file(str(d / "med_config.json"))
    config.encoder_width = width
    blip.text_encoder = BertModel(config=config, add_pooling_layer=False)
    blip.vision_proj = nn.Linear(width, 256)
    blip.text_proj = nn.Linear(med["hidden_size"], 256)

    model = official.ImageReward.__new__(official.ImageReward)
    nn.Module.__init__(model)
    model.device = "cpu"
    model.blip = blip
    model.preprocess = official._transform(224)
    model.mlp = official.MLP(med["hidden_size"])
    model.mean, model.std = 0.16717362830052426, 1.0333394966054072
    missing, unexpected = model.load_state_dict(state, strict=True), None
    del missing, unexpected
    model.eval()

    result = {
        "package": f"image-reward==1.5 (transformers=={transformers.__version__})",
        "score": [],
        "input_ids": [],
    }
    with torch.no_grad():
        for name, prompt, image in _case_list():
            result["score"].append(float(model.score(prompt, image)))
    for prompt in _cases.PROMPTS:
        ids = blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35)["input_ids"]
        result["input_ids"].append(list(ids))
    return result


def stage_merge(out: Path) -> None:
    merged = {
        "_note": "Scores from the official packages on diffalign's tiny weights; see make_official_fixtures.py.",
        "cases": [[n, p] for n, p in _cases.pairs()],
    }
    for part in ("torchmetrics", "hps", "imagereward"):
        path = out / f"{part}.json"
        if path.is_file():
            merged[part] = json.loads(path.read_text())
    target = HERE.parent / "data" / "official_scores.json"
    target.write_text(json.dumps(merged, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {target} with {sorted(k for k in merged if not k.startswith('_'))}")


def main(argv: list[str]) -> int:
    stage, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if stage == "weights":
        stage_weights(out)
    elif stage == "merge":
        stage_merge(out)
    else:
        result = {"torchmetrics": stage_torchmetrics, "hps": stage_hps, "imagereward": stage_imagereward}[
            stage
        ](out)
        (out / f"{stage}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
        print(json.dumps(result, indent=1, ensure_ascii=False)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
