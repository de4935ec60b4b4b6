"""Second captions for DCPO: an offline word-swap stand-in and a pluggable image captioner.

DCPO (Saeidi et al., TMLR 2025) conditions the loser on its own caption z_l. Where z_l comes from:

* ``column``: precomputed captions in the data. This is what the official code trains on (``--caption_0
  caption_0 --caption_1 caption_1``, DualCPO/pick-double-caption) and the only way to reproduce DCPO-p and
  DCPO-h: their loser captions are **DIPPER paraphrases** (T5-XXL, lexical diversity 40/60/80; the official
  ``src/perturb_caption.py`` of ``sahsaeedi/DCPO-T2I`` paraphrases the per-image captions and pickles them by
  row index), produced offline and joined into the dataset as a column.
* ``word_swap``: z_w = c, z_l = c with a fraction of its content words replaced (:class:`WordSwap`). Not
  DIPPER and not a paraphrase: each swapped word becomes another word of the **same class** when it belongs to
  a known class (colours, shapes, sizes; "a red circle" may become "a green circle") and a random word of the
  caption vocabulary otherwise, so on real prompts it writes word salad. An offline stand-in for worlds with a
  closed vocabulary (the toy world); deterministic given a ``random.Random``.
* ``caption`` (DCPO-c): z_w, z_l written by an image-to-text model (:func:`load_captioner`, a transformers
  ``image-to-text`` pipeline by hub id or local folder).
* ``hybrid``: z_l = word_swap(caption of x_l).
"""

from __future__ import annotations

import random
import re

STOPWORDS = frozenset(["a", "an", "the", "of", "on", "in", "with", "and", "or", "to", "at", "by", "for",
                       "from", "into", "over", "under", "is", "are", "its", "it", "this", "that"])
WORD_CLASSES = {
    "colour": ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown",
               "gray", "cyan", "magenta"],
    "shape": ["circle", "square", "triangle", "star", "cross", "ring", "rectangle", "diamond", "hexagon"],
    "size": ["small", "large", "big", "tiny", "huge"],
}


def caption_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one pair's second caption in one epoch. Seeded from a string, which ``random.Random``
    hashes with SHA-512: the same in every process and Python version (``hash()`` of a str is salted per
    process).
    """
    return random.Random(f"diffalign-caption:{seed}:{epoch}:{index}")


class WordSwap:
    """Replace ``round(fraction · #content words)`` (at least one) content words of a caption.

    >>> WordSwap(0.4, vocabulary=["dog"])("a red circle", random.Random(0))   # doctest: +SKIP
    'a green circle'
    """

    def __init__(self, fraction: float = 0.6, vocabulary: list[str] | None = None,
                 word_classes: dict[str, list[str]] | None = None):
        if not 0 < fraction <= 1:
            raise ValueError(f"word-swap fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.classes = WORD_CLASSES if word_classes is None else word_classes
        self.word_class = {w: c for c, words in self.classes.items() for w in words}
        self.vocabulary = sorted(set(vocabulary or [])) or sorted(self.word_class)

    def __call__(self, caption: str, rng: random.Random) -> str:
        tokens = re.findall(r"\w+|\W+", caption)
        content = [i for i, tok in enumerate(tokens)
                   if tok.strip() and tok.isalnum() and tok.lower() not in STOPWORDS]
        if not content:
            return caption
        k = max(1, round(self.fraction * len(content)))
        for i in rng.sample(content, k):
            word = tokens[i].lower()
            cls = self.word_class.get(word)
            pool = [w for w in (self.classes[cls] if cls else self.vocabulary) if w != word]
            if pool:
                tokens[i] = rng.choice(pool)
        out = "".join(tokens)
        if out == caption:  # never return the prompt unchanged
            i = rng.choice(content)
            pool = [w for w in self.vocabulary if w != tokens[i].lower()]
            tokens[i] = rng.choice(pool) if pool else tokens[i] + "s"
            out = "".join(tokens)
        return out


def caption_vocabulary(captions, limit: int = 5000) -> list[str]:
    words: dict[str, int] = {}
    for c in captions:
        for w in re.findall(r"[a-z]+", str(c).lower()):
            if w not in STOPWORDS:
                words[w] = words.get(w, 0) + 1
    return [w for w, _ in sorted(words.items(), key=lambda kv: -kv[1])[:limit]]


def load_captioner(model: str, device: str | None = None, max_new_tokens: int = 40):
    """``captioner(images: list[PIL]) -> list[str]`` from a transformers image-to-text model (hub id or
    folder)."""
    from transformers import pipeline

    pipe = pipeline("image-to-text", model=model, device=device)

    def captioner(images):
        return [out[0]["generated_text"].strip() for out in pipe(images, max_new_tokens=max_new_tokens)]

    return captioner
