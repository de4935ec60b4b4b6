"""Second captions for DCPO: an offline prompt perturber and a pluggable image captioner.

DCPO (Saeidi et al., TMLR 2025) conditions the loser on its own caption z_l. Three ways to get it:

* ``perturb`` (DCPO-p): z_w = c, z_l = perturb(c). The official code paraphrases with the DIPPER T5-XXL model at
  lexical diversity 40/60/80 (weak/medium/strong). :class:`CaptionPerturber` is the offline stand-in: it replaces a
  fraction 0.4/0.6/0.8 of the content words, each by another word of the **same class** when the word belongs to a
  known class (colours, shapes, ...; so "a red circle" may become "a green circle") and by a random word of the
  caption vocabulary otherwise. Deterministic given a ``random.Random``.
* ``caption`` (DCPO-c): z_w, z_l written by an image-to-text model (:func:`load_captioner`, a transformers
  ``image-to-text`` pipeline by hub id or local folder).
* ``hybrid`` (DCPO-h): z_l = perturb(caption of x_l).
"""

from __future__ import annotations

import random
import re

LEVELS = {"weak": 0.4, "medium": 0.6, "strong": 0.8}
STOPWORDS = frozenset(["a", "an", "the", "of", "on", "in", "with", "and", "or", "to", "at", "by", "for", "from", "into", "over", "under", "is", "are", "its", "it", "this", "that"])
WORD_CLASSES = {
    "colour": ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "gray", "cyan",
               "magenta"],
    "shape": ["circle", "square", "triangle", "star", "cross", "ring", "rectangle", "diamond", "hexagon"],
    "size": ["small", "large", "big", "tiny", "huge"],
}


class CaptionPerturber:
    def __init__(self, level: str = "medium", vocabulary: list[str] | None = None,
                 word_classes: dict[str, list[str]] | None = None):
        if level not in LEVELS:
            raise ValueError(f"perturbation level must be one of {list(LEVELS)}, got {level!r}")
        self.fraction = LEVELS[level]
        self.classes = WORD_CLASSES if word_classes is None else word_classes
        self.word_class = {w: c for c, words in self.classes.items() for w in words}
        self.vocabulary = sorted(set(vocabulary or [])) or sorted(self.word_class)

    def __call__(self, caption: str, rng: random.Random) -> str:
        tokens = re.findall(r"\w+|\W+", caption)
        content = [i for i, tok in enumerate(tokens) if tok.strip() and tok.isalnum() and tok.lower() not in STOPWORDS]
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
    """``captioner(images: list[PIL]) -> list[str]`` from a transformers image-to-text model (hub id or folder)."""
    from transformers import pipeline

    pipe = pipeline("image-to-text", model=model, device=device)

    def captioner(images):
        return [out[0]["generated_text"].strip() for out in pipe(images, max_new_tokens=max_new_tokens)]

    return captioner
