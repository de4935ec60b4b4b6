"""A real CLIP BPE tokenizer with no download: open_clip's wheel ships CLIP's BPE merges
(``bpe_simple_vocab_16e6.txt.gz``); from it we write the ``vocab.json`` / ``merges.txt`` pair that
``transformers.CLIPTokenizer`` reads. The vocabulary is built the way OpenAI's ``simple_tokenizer.py`` builds it
(256 byte symbols, their ``</w>`` forms, 48,894 merges, then the two special tokens: 49,408 ids), which is the
vocabulary of ``openai/clip-vit-large-patch14``'s tokenizer.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407


def _bytes_to_unicode() -> dict[int, str]:
    # Same reversible byte -> printable-unicode map as GPT-2/CLIP's BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[str]]:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(_bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer_files(directory: str | os.PathLike) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` for a CLIP tokenizer into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_bpe()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def clip_tokenizer(directory: str | os.PathLike | None = None, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with CLIP's real vocabulary, built offline.

    ``directory``: where to write the files (a temporary directory when ``None``).
    """
    import tempfile

    from transformers import CLIPTokenizer

    if directory is None:
        directory = tempfile.mkdtemp(prefix="diffalign-clip-tok-")
    write_clip_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=model_max_length)
