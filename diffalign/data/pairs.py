"""Preference-pair datasets: the Pick-a-Pic v2 schema and ``prompt, chosen, rejected`` manifests.

Sources (``dataset.source``):

* a hub id (``datasets.load_dataset(id, split=...)``; streaming allowed). The canonical
  ``yuvalkirstain/pickapic_v2`` is gone from the hub; mirrors: ``liuhuohuo2/pick-a-pic-v2`` (full),
  ``kashif/pickascore`` (tiny, split ``validation``), ``sayakpaul/pickapic_v2_webdataset`` (tars);
* a local folder written by ``save_to_disk``, or holding ``*.parquet`` / ``*.arrow`` files;
* webdataset tars (a ``.tar`` path, a glob, or a list): keys ``jpg_0``, ``jpg_1``, ``label_0``, ``label_1``
  and ``caption`` or ``original_prompt``;
* a JSONL / CSV manifest with ``prompt, chosen, rejected`` image paths (relative to the manifest's folder).

Pick-a-Pic rows are ``caption, jpg_0, jpg_1, label_0, label_1``: ``label_0 = 1`` means image 0 won,
``0.5/0.5`` is a tie (dropped by default, as the official code does; ``keep_ties`` trains them as the SFT-free
'image 0 wins' the diffusers example silently uses — not recommended). Rows with NaN or out-of-range labels
are dropped and counted. Each item is decoded lazily; an unreadable or missing image makes the item
``{"unreadable": index, "reason": ...}``: the collate function drops it and lists it, so a bad file is never
trained on (the trainer counts it, and stops when too few pairs can be read).
"""

from __future__ import annotations

import glob
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .captions import caption_rng
from .images import PairTransform, UnreadableImage, decode_image

MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
MANIFEST_COLUMNS = ("prompt", "chosen", "rejected")


class DatasetFormatError(ValueError):
    """The data source lacks required columns or cannot be read."""


@dataclass
class FilterStats:
    rows: int = 0
    ties_dropped: int = 0
    bad_labels_dropped: int = 0
    kept: int = 0


def _is_tar_source(source) -> bool:
    items = source if isinstance(source, (list, tuple)) else [source]
    return all(str(s).endswith(".tar") for s in items)


def _load_hf(source, split: str, streaming: bool):
    import datasets

    if isinstance(source, (list, tuple)) or _is_tar_source(source):
        files = []
        for s in source if isinstance(source, (list, tuple)) else [source]:
            files += sorted(glob.glob(str(s))) or [str(s)]
        return datasets.load_dataset("webdataset", data_files={split: files}, split=split,
                                     streaming=streaming)
    path = Path(str(source))
    if path.suffix in MANIFEST_SUFFIXES and path.is_file():
        if not path.read_text(errors="replace").strip():
            raise DatasetFormatError(f"manifest {str(path)!r} is empty: expected one pair per line "
                                     f"({', '.join(MANIFEST_COLUMNS)})")
        kind = "csv" if path.suffix == ".csv" else "json"
        return datasets.load_dataset(kind, data_files={split: str(path)}, split=split, streaming=streaming)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (
            path / "dataset_dict.json"
        ).exists():
            ds = datasets.load_from_disk(str(path))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        for ext, builder in (("parquet", "parquet"), ("arrow", "arrow")):
            files = sorted(str(p) for p in path.rglob(f"*.{ext}"))
            if files:
                return datasets.load_dataset(builder, data_files={split: files}, split=split,
                                             streaming=streaming)
        raise DatasetFormatError(f"dataset folder {str(path)!r} holds no save_to_disk dataset, parquet or "
                                 "arrow files")
    if path.exists():
        raise DatasetFormatError(f"unsupported dataset file {str(path)!r}: use .jsonl/.csv, a folder or "
                                 ".tar shards")
    try:
        return datasets.load_dataset(str(source), split=split, streaming=streaming)
    except Exception as err:  # noqa: BLE001 - one line for the user, whatever the hub client raised
        raise DatasetFormatError(
            f"could not load dataset {str(source)!r} (split {split!r}): "
            f"{str(err).splitlines()[0] if str(err) else err!r}"
        ) from None


def _rename_webdataset_columns(ds):
    mapping = {}
    for col in ds.column_names or []:
        base = col.split(".")[0]
        if base == "original_prompt":
            base = "caption"
        if base != col and base in ("jpg_0", "jpg_1", "label_0", "label_1", "caption"):
            mapping[col] = base
    return ds.rename_columns(mapping) if mapping else ds


def _label(value) -> float:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    return float(str(value).strip()) if isinstance(value, str) else float(value)


def pickapic_winner(label_0, label_1, keep_ties: bool) -> int | None:
    """0 or 1: which image won; ``None`` to drop (tie without ``keep_ties``, NaN or labels outside [0, 1])."""
    try:
        l0, l1 = _label(label_0), _label(label_1)
    except (TypeError, ValueError):
        return None
    if math.isnan(l0) or math.isnan(l1) or not (0 <= l0 <= 1 and 0 <= l1 <= 1):
        return None
    if l0 == l1:
        return 0 if keep_ties else None
    return 0 if l0 > l1 else 1


@dataclass
class DualCaptions:
    """Per-image captions (z_w, z_l) for DCPO; ``mode`` is ``column``, ``word_swap``, ``caption`` or
    ``hybrid`` (:mod:`diffalign.data.captions`). ``columns``: explicit (z_w, z_l) column names for
    ``column``/``hybrid``."""

    mode: str
    word_swap: object | None = None  # WordSwap
    captioner: object | None = None  # callable(list[PIL]) -> list[str]
    columns: tuple[str, str] | None = None

    @property
    def needs_images(self) -> bool:
        return self.captioner is not None

    def __call__(self, pairs: PreferencePairs, index: int, images, rng: random.Random) -> tuple[str, str]:
        c = pairs.caption(index)
        if self.mode == "word_swap":
            return c, self.word_swap(c, rng)
        if self.captioner is not None:
            z_w, z_l = self.captioner(list(images))
        else:
            z_w, z_l = pairs.image_captions(index, self.columns)
        if self.mode == "hybrid":
            z_l = self.word_swap(z_l, rng)
        return z_w, z_l


class PreferencePairs(torch.utils.data.Dataset):
    """Map-style dataset of preference pairs.

    Item ``i``: a dict with ``pixels_w``, ``pixels_l`` (3, R, R) in [-1, 1], ``caption`` (str),
    ``original_size`` (h, w), ``crop_top_left`` (top, left), ``flip`` (bool), ``index`` (int); or, if an image
    is unreadable, ``{"unreadable": index, "reason": message}`` (the message names the file when the image is
    a path). Augmentation randomness comes from ``(seed, epoch, index)`` so it does not depend on worker count
    or resume.
    """

    def __init__(self, source, *, split: str = "train", transform: PairTransform | None = None,
                 keep_ties: bool = False, max_samples: int | None = None, seed: int = 0,
                 caption_column: str = "caption"):
        ds = _load_hf(source, split, streaming=False)
        self.base_dir = Path(str(source)).parent if str(source).endswith(MANIFEST_SUFFIXES) else None
        cols = set(ds.column_names)
        if _is_tar_source(source):
            ds = _rename_webdataset_columns(ds)
            cols = set(ds.column_names)
        if set(MANIFEST_COLUMNS) <= cols:
            self.kind = "manifest"
            self.winner = None
        elif {"jpg_0", "jpg_1", "label_0", "label_1", caption_column} <= cols:
            self.kind = "pickapic"
        else:
            raise DatasetFormatError(
                f"dataset {str(source)!r} has columns {sorted(cols)}; expected Pick-a-Pic columns "
                f"{list(PICKAPIC_COLUMNS)} or a manifest with {list(MANIFEST_COLUMNS)}"
            )
        self.stats = FilterStats(rows=len(ds))
        self.caption_column = "prompt" if self.kind == "manifest" else caption_column
        if self.kind == "pickapic":
            labels = ds.select_columns(["label_0", "label_1"])
            winners, keep = [], []
            for i, row in enumerate(labels):
                w = pickapic_winner(row["label_0"], row["label_1"], keep_ties)
                if w is None:
                    l0, l1 = row["label_0"], row["label_1"]
                    try:
                        tie = _label(l0) == _label(l1)
                    except (TypeError, ValueError):
                        tie = False
                    if tie:
                        self.stats.ties_dropped += 1
                    else:
                        self.stats.bad_labels_dropped += 1
                    continue
                winners.append(w)
                keep.append(i)
            ds = ds.select(keep)
            self.winner = winners
        if max_samples is not None:
            ds = ds.select(range(min(max_samples, len(ds))))
        self.stats.kept = len(ds)
        if len(ds) == 0:
            raise DatasetFormatError(f"dataset {str(source)!r} has no usable preference pairs "
                                     f"(rows {self.stats.rows}, ties dropped {self.stats.ties_dropped}, "
                                     f"bad labels {self.stats.bad_labels_dropped})")
        self.ds = ds
        self.transform = transform or PairTransform()
        self.seed = seed
        self.epoch = 0
        self.latent_cache = None  # an EmbeddingCache: cached items skip decoding (set by the trainer)
        self.dual_captions: DualCaptions | None = None  # DCPO: per-image captions (set by the trainer)

    def __len__(self) -> int:
        return len(self.ds)

    def caption(self, index: int) -> str:
        value = self.ds[index][self.caption_column]
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", errors="replace")
        return "" if value is None else str(value)

    def image_captions(self, index: int, columns: tuple[str, str] | None = None) -> tuple[str, str]:
        """(z_w, z_l) from the named (winner, loser) ``columns``, else from
        ``caption_chosen``/``caption_rejected`` or per-image ``caption_0``/``caption_1`` columns (swapped with
        the images, as the official DCPO code does)."""
        row = self.ds[index]
        if columns is not None:
            missing = [c for c in columns if c not in row]
            if missing:
                raise DatasetFormatError(f"caption column {missing[0]!r} is not in the dataset; it has "
                                         f"{sorted(self.ds.column_names)}")
            return str(row[columns[0]]), str(row[columns[1]])
        if "caption_chosen" in row and "caption_rejected" in row:
            return str(row["caption_chosen"]), str(row["caption_rejected"])
        if "caption_0" in row and "caption_1" in row and self.kind == "pickapic":
            w = self.winner[index]
            return str(row[f"caption_{w}"]), str(row[f"caption_{1 - w}"])
        raise DatasetFormatError(
            "per-image captions need `caption_chosen`/`caption_rejected` (or Pick-a-Pic "
            "`caption_0`/`caption_1`) columns, or objective.caption_columns naming them; this dataset has "
            f"{sorted(self.ds.column_names)}"
        )

    def rng(self, index: int) -> random.Random:
        return random.Random(hash((self.seed, self.epoch, index)) & 0xFFFFFFFF)

    def raw_images(self, index: int):
        row = self.ds[index]
        if self.kind == "manifest":
            return row["chosen"], row["rejected"]
        w = self.winner[index]
        return row[f"jpg_{w}"], row[f"jpg_{1 - w}"]

    def __getitem__(self, index: int):
        dual = self.dual_captions
        if self.latent_cache is not None and not (dual and dual.needs_images):
            flip = self.transform.decide_flip(self.rng(index))
            entry = self.latent_cache.get_latents(index, flip)
            if entry is not None:
                item = {
                    "latent_mean": entry["mean"], "latent_std": entry["std"], "caption": self.caption(index),
                    "index": index, "original_size": tuple(entry["original_size"].tolist()),
                    "crop_top_left": tuple(entry["crop_top_left"].tolist()), "flip": flip,
                }
                return self._add_dual_captions(item, index, None)
        try:
            raw_w, raw_l = self.raw_images(index)
            img_w = decode_image(raw_w, self.base_dir)
            img_l = decode_image(raw_l, self.base_dir)
        except UnreadableImage as err:
            return {"unreadable": index, "reason": str(err)}
        pixels_w, pixels_l, original, crop, flip = self.transform(img_w, img_l, self.rng(index))
        item = {
            "pixels_w": pixels_w, "pixels_l": pixels_l, "caption": self.caption(index), "index": index,
            "original_size": original, "crop_top_left": crop, "flip": flip,
        }
        return self._add_dual_captions(item, index, (img_w, img_l))

    def _add_dual_captions(self, item: dict, index: int, images) -> dict:
        if self.dual_captions is not None:
            rng = caption_rng(self.seed, self.epoch, index)
            item["caption"], item["caption_l"] = self.dual_captions(self, index, images, rng)
        return item


def collate_pairs(items: list) -> dict:
    """Stack the readable items; ``num_skipped`` counts the unreadable ones (``None`` or
    ``{"unreadable": i, ...}``), ``unreadable`` lists them as ``(index, reason)``.

    Items decoded from images give ``pixels_w/l`` (P, 3, R, R) at rows ``pixel_rows`` of the batch; items
    served from the latent cache give ``latent_mean/std`` (Q, 2, C, h, w) at rows ``latent_rows``.
    """
    good = [x for x in items if x is not None and "unreadable" not in x]
    unreadable = [(x["unreadable"], x["reason"]) for x in items if x is not None and "unreadable" in x]
    batch = {"num_skipped": len(items) - len(good), "size": len(good), "unreadable": unreadable}
    if not good:
        return batch
    pix = [i for i, x in enumerate(good) if "pixels_w" in x]
    lat = [i for i, x in enumerate(good) if "latent_mean" in x]
    batch["pixel_rows"], batch["latent_rows"] = pix, lat
    if pix:
        batch["pixels_w"] = torch.stack([good[i]["pixels_w"] for i in pix])  # (P, 3, R, R)
        batch["pixels_l"] = torch.stack([good[i]["pixels_l"] for i in pix])
    if lat:
        batch["latent_mean"] = torch.stack([good[i]["latent_mean"] for i in lat])  # (Q, 2, C, h, w)
        batch["latent_std"] = torch.stack([good[i]["latent_std"] for i in lat])
    batch["captions"] = [x["caption"] for x in good]
    if "caption_l" in good[0]:
        batch["captions_l"] = [x["caption_l"] for x in good]  # DCPO: the losers' own captions
    batch["indices"] = torch.tensor([x["index"] for x in good])
    batch["original_sizes"] = torch.tensor([x["original_size"] for x in good])  # (B, 2) (h, w)
    batch["crops_top_left"] = torch.tensor([x["crop_top_left"] for x in good])  # (B, 2) (top, left)
    batch["flips"] = torch.tensor([x["flip"] for x in good])
    return batch


@dataclass
class ResumableSampler(torch.utils.data.Sampler):
    """Indices of one epoch: a permutation drawn from ``(seed, epoch)``, sharded by rank, starting at
    ``start``.

    Resuming at (epoch, start) replays exactly the indices an uninterrupted run would have seen next, without
    decoding the skipped ones.
    """

    num_samples: int
    seed: int = 0
    epoch: int = 0
    start: int = 0
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1
    _order: list = field(default_factory=list, repr=False)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        return order[self.rank :: self.world_size][self.start :]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())
