"""Rewards: any :mod:`diffalign.evaluators` scorer (and the toy oracle, ``"toy"``) as a reward, several at
once with weights, each computed in process or by a reward server in another process or machine.

A reward specification names scorers and their weights::

    spec = RewardSpec.parse("pickscore:1.0,toy:0.5")                    # or {"pickscore": 1.0, "toy": 0.5}
    spec = RewardSpec.parse({"hpsv2.1": {"weight": 1.0, "weights": "/ckpt/hps"}, "clip": 0.2})
    rewards = Rewards(spec, device="cuda", dtype="fp16")                 # loads each scorer once
    total, per_scorer = rewards(images, prompts)                         # (N,), {name: (N,)}

Definitions: for scorers ``k = 1..K`` with weights ``w_k`` and raw scores ``r_k`` (each scorer's own scale,
higher is better), ``total = Σ_k w_k r_k``, float32 (N,) on CPU. A weight may be negative (a penalty) or zero
(the scorer is computed and reported in ``per_scorer`` but does not enter the total). Scores are raw, not
normalised: GRPO's per-prompt advantages (:func:`~diffalign.online.grpo.group_advantages`) remove each
prompt's offset and scale, but the weights set how the scorers trade against each other, so pick them with the
scorers' spreads in mind (PickScore's spread across images of one prompt is about 1, the toy oracle's about
0.3).

String syntax: comma-separated ``name[:weight]`` items (weight 1 when omitted), e.g. ``"hpsv2.1:1,clip:0.2"``.
A ``weights=`` folder (hub id, local directory or file, as :func:`diffalign.evaluators.load` takes) per scorer
comes from the dict form (``{"name": {"weight": w, "weights": path, **load options}}``) or from
``weights={name: path}`` passed to :meth:`RewardSpec.parse`.

Remote scorers: a term whose options hold ``url`` is not loaded here but scored by the
:class:`~diffalign.online.reward_server.RewardServer` at that URL (started with ``python -m
diffalign.online.reward_server --metric NAME --port PORT``; images travel as PNG, so the scores equal the
in-process ones exactly)::

    spec = RewardSpec.parse({"pickscore": {"weight": 1.0, "url": "http://gpu-box:18085"}, "toy": 0.5})
    spec = RewardSpec.parse("pickscore:1.0@http://gpu-box:18085,toy:0.5")              # the same

In the string form the URL follows ``@`` after the weight, ``name[:weight]@url``, and runs to the next comma
(so it may not hold one). The form ``name@url:weight`` is not accepted: ``pickscore@http://host:18085``
would be ambiguous (a port or a weight?); it fails with a one-line error. Besides ``url`` and ``weight``, a
remote term takes only the client options ``timeout`` (seconds per request) and ``retries`` (see
:class:`~diffalign.online.reward_server.RemoteScorer`); the scorer's weights and load options belong to the
server (``--weights`` there), so giving them here is an error. A remote server must serve the term's metric
(it reports its name), and ``device``/``dtype``/``batch_size`` of :class:`Rewards` do not apply to it.

Importing this module loads neither torch models nor the evaluators: :class:`Rewards` imports
:mod:`diffalign.evaluators` when it is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["RewardSpec", "RewardTerm", "Rewards", "to_pil_images"]


@dataclass(frozen=True)
class RewardTerm:
    """One scorer of a reward: registry ``name``, ``weight`` ``w`` in ``Σ w r``, ``weights`` (hub id / folder
    / file for :func:`diffalign.evaluators.load`; ``None`` = official) and extra ``options`` for ``load`` (or,
    with ``url`` among them, for :class:`~diffalign.online.reward_server.RemoteScorer`: ``url``, ``timeout``,
    ``retries``)."""

    name: str
    weight: float = 1.0
    weights: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def url(self) -> str | None:
        """The reward server scoring this term, or ``None`` (scored in process)."""
        return self.options.get("url")


# the options a remote term (one with a ``url``) may carry besides its weight
REMOTE_OPTIONS = ("url", "timeout", "retries")


def _check_remote(t: RewardTerm) -> None:
    if "url" not in t.options:
        return
    from .reward_server import check_url

    try:
        check_url(t.options["url"])
    except ValueError as exc:
        raise ValueError(f"reward {t.name!r}: {exc} In a string spec write 'name:weight@http://host:port'.") \
            from None
    extra = sorted(set(t.options) - set(REMOTE_OPTIONS))
    if t.weights is not None or extra:
        given = ", ".join((["weights"] if t.weights is not None else []) + extra)
        raise ValueError(f"reward {t.name!r} is scored by the server at {t.options['url']}; {given} belong to "
                         f"that server (python -m diffalign.online.reward_server --weights ...), not to the "
                         f"reward spec (a remote term takes {', '.join(REMOTE_OPTIONS)}).")


def _available() -> list[str]:
    from diffalign.evaluators import available  # cheap: the registry, no models

    return available()


def _parse_weight(name: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"reward {name!r}: weight must be a number, got {value!r}.")  # noqa: TRY004
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"reward {name!r}: weight must be a number, got {value!r}.") from None
    if not math.isfinite(weight):
        raise ValueError(f"reward {name!r}: weight must be finite, got {value!r}.")
    return weight


@dataclass(frozen=True)
class RewardSpec:
    """An ordered tuple of :class:`RewardTerm` with distinct names (build it with :meth:`parse`)."""

    terms: tuple[RewardTerm, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    @property
    def weights(self) -> dict[str, float]:
        """``{name: w}`` in spec order."""
        return {t.name: t.weight for t in self.terms}

    def __str__(self) -> str:
        return ",".join(f"{t.name}:{t.weight:g}" + (f"@{t.url}" if t.url else "") for t in self.terms)

    @classmethod
    def parse(
        cls,
        spec: str | Mapping | RewardSpec | Sequence[RewardTerm],
        *,
        weights: Mapping[str, str] | None = None,
    ) -> RewardSpec:
        """Parse ``"name[:w][@url],name[:w][@url],..."``, ``{name: w}``, ``{name: {"weight": w, "weights":
        path, **opts}}`` (``{"weight": w, "url": url}`` for a remote scorer), a list of :class:`RewardTerm` or a
        ``RewardSpec`` (returned as is unless ``weights`` is given).

        Args:
            spec: the reward specification (see the module docstring).
            weights: optional ``{name: hub id / folder / file}`` for :func:`diffalign.evaluators.load`;
                overrides a ``weights`` given in ``spec``.

        Raises:
            ValueError (one line): empty spec, unknown scorer name, non-numeric or non-finite weight, a name
                given twice, ``weights`` for a scorer not in the spec, a malformed item or URL, or load
                options (``weights`` included) for a remote term.
        """
        if isinstance(spec, RewardSpec):
            terms = list(spec.terms)
        elif isinstance(spec, str):
            terms = []
            for item in spec.split(","):
                item = item.strip()
                if not item:
                    if spec.strip():
                        raise ValueError(f"reward spec {spec!r}: empty item; use 'name:weight,name:weight'.")
                    continue
                item, at, url = item.partition("@")
                name, sep, value = item.partition(":")
                name = name.strip()
                if not name:
                    raise ValueError(f"reward spec {spec!r}: item {item!r} has no scorer name.")
                options = {"url": url.strip()} if at else {}
                terms.append(RewardTerm(name, _parse_weight(name, value.strip()) if sep else 1.0, None, options))
        elif isinstance(spec, Mapping):
            terms = []
            for name, value in spec.items():
                if isinstance(value, Mapping):
                    opts = dict(value)
                    weight = _parse_weight(name, opts.pop("weight", 1.0))
                    terms.append(RewardTerm(str(name), weight, opts.pop("weights", None), opts))
                else:
                    terms.append(RewardTerm(str(name), _parse_weight(name, value)))
        elif isinstance(spec, Sequence) and all(isinstance(t, RewardTerm) for t in spec):
            terms = list(spec)
        else:
            raise ValueError(
                "reward spec must be a string 'name:weight,...' or a dict {name: weight}; "
                f"got {type(spec).__name__}."
            )
        if not terms:
            raise ValueError("reward spec is empty; name at least one scorer, e.g. 'pickscore:1.0'.")
        known = _available()
        seen = set()
        for t in terms:
            if t.name not in known:
                raise ValueError(f"unknown reward scorer {t.name!r}; available: {', '.join(known)}.")
            if t.name in seen:
                raise ValueError(f"reward scorer {t.name!r} is given twice; give each scorer once.")
            seen.add(t.name)
            _parse_weight(t.name, t.weight)
        if weights:
            extra = sorted(set(weights) - seen)
            if extra:
                raise ValueError(f"weights given for {', '.join(extra)}, not in the reward spec "
                                 f"({', '.join(t.name for t in terms)}).")
            terms = [
                RewardTerm(t.name, t.weight, weights.get(t.name, t.weights), dict(t.options)) for t in terms
            ]
        for t in terms:
            _check_remote(t)
        return cls(tuple(terms))


def to_pil_images(images) -> list:
    """Images as a list of RGB PIL images.

    Accepts a list of PIL images, a uint8 array (N, H, W, 3), a float array/tensor (N, H, W, 3) or
    (N, 3, H, W) with values in [0, 1] (clipped, rounded to uint8).
    """
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, 3) or (N, 3, H, W); got shape {images.shape}.")
        if images.shape[-1] != 3 and images.shape[1] == 3:
            images = images.transpose(0, 2, 3, 1)
        if images.dtype != np.uint8:
            images = np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
        return [Image.fromarray(im, "RGB") for im in images]
    return [im.convert("RGB") if im.mode != "RGB" else im for im in images]


class Rewards:
    """A weighted sum of scorers, each loaded once.

    Args:
        spec: anything :meth:`RewardSpec.parse` takes.
        weights: optional ``{name: hub id / folder / file}`` (see :meth:`RewardSpec.parse`).
        device, dtype, batch_size: passed to :func:`diffalign.evaluators.load` (``batch_size`` = images per
            forward pass inside a scorer).
        chunk_size: images scored per chunk by :meth:`__call__` (bounds the PIL conversion and the scorers'
            working set); ``None`` = all at once.
        scorers: optional ``{name: scorer}`` already built (anything with ``score(images, prompts) -> (N,)``);
            these are used instead of loading (share one scorer between the training reward and a held-out
            set).

    A term with a ``url`` is scored by a :class:`~diffalign.online.reward_server.RemoteScorer` (nothing is
    loaded here, and nothing is sent until the first call); ``device``, ``dtype`` and ``batch_size`` do not
    apply to it, and each chunk of ``chunk_size`` images is one request.

    Attributes:
        spec: the parsed :class:`RewardSpec`; scorers: ``{name: scorer}`` in spec order.
    """

    def __init__(
        self,
        spec,
        *,
        weights: Mapping[str, str] | None = None,
        device: str = "cpu",
        dtype=None,
        batch_size: int = 16,
        chunk_size: int | None = 64,
        scorers: Mapping | None = None,
    ):
        self.spec = RewardSpec.parse(spec, weights=weights)
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1 or None; got {chunk_size}.")
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        scorers = dict(scorers or {})
        unknown = sorted(set(scorers) - set(self.spec.names))
        if unknown:
            raise ValueError(f"scorers given for {', '.join(unknown)}, not in the reward spec ({self.spec}).")
        self.scorers = {}
        for t in self.spec.terms:
            if t.name in scorers:
                self.scorers[t.name] = scorers[t.name]
            elif t.url:
                from .reward_server import RemoteScorer

                remote = {k: v for k, v in t.options.items() if k != "url"}
                self.scorers[t.name] = RemoteScorer(t.url, batch_size=None, expect_metric=t.name, **remote)
            else:
                from diffalign.evaluators import load

                self.scorers[t.name] = load(
                    t.name, weights=t.weights, device=device, dtype=dtype, batch_size=batch_size, **t.options
                )

    @property
    def names(self) -> list[str]:
        return self.spec.names

    @property
    def weights(self) -> dict[str, float]:
        return self.spec.weights

    def __repr__(self) -> str:
        return f"Rewards({str(self.spec)!r})"

    def __call__(self, images, prompts: Sequence[str] | str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score ``images`` against ``prompts``.

        Args:
            images: N images (list of PIL, uint8 (N, H, W, 3), or float (N, 3, H, W) / (N, H, W, 3) in
                [0, 1]).
            prompts: N prompts, or one prompt for all.

        Returns:
            ``(total, per_scorer)``: ``total`` float32 (N,) on CPU = ``Σ_k w_k r_k``; ``per_scorer``
            ``{name: r_k}`` float32 (N,) on CPU, raw (unweighted) scores, in spec order.
        """
        images = to_pil_images(images)
        n = len(images)
        if isinstance(prompts, str):
            prompts = [prompts] * n
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(f"got {n} images for {len(prompts)} prompts; pass one prompt per image.")
        step = self.chunk_size or max(n, 1)
        parts: dict[str, list[torch.Tensor]] = {name: [torch.zeros(0)] for name in self.names}
        with torch.no_grad():
            for start in range(0, n, step):
                ims, ps = images[start:start + step], prompts[start:start + step]
                for name, scorer in self.scorers.items():
                    r = torch.as_tensor(scorer.score(ims, ps)).detach().float().cpu().reshape(-1)
                    if r.numel() != len(ims):
                        raise ValueError(f"reward {name!r} returned {r.numel()} scores for {len(ims)} "
                                         "images.")
                    parts[name].append(r)
        per_scorer = {name: torch.cat(p) for name, p in parts.items()}
        total = torch.zeros(n, dtype=torch.float32)
        for t in self.spec.terms:
            if t.weight != 0.0:
                total = total + t.weight * per_scorer[t.name]
        return total, per_scorer

    score = __call__

    def record(
        self, total: torch.Tensor, per_scorer: Mapping[str, torch.Tensor], prefix: str = "reward"
    ) -> dict:
        """Batch means for a log / :class:`~diffalign.online.monitor.HackingMonitor` record:
        ``{prefix: mean total, f"{prefix}/{name}": mean r_k}`` (floats)."""
        out = {prefix: float(total.float().mean())} if total.numel() else {}
        out.update({f"{prefix}/{k}": float(v.float().mean()) for k, v in per_scorer.items() if v.numel()})
        return out
