"""Find scorer weights: a local directory, a local file, the Hugging Face cache, or a download.

Offline and without a local copy, every helper raises :class:`WeightsNotFoundError` with one line that names the
id and where to put the files; it never waits on the hub's retry loop (a quick connectivity probe comes first).
Set ``HF_HUB_OFFLINE=1`` (or ``DIFFALIGN_OFFLINE=1``) to skip the probe altogether.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ._errors import WeightsNotFoundError

# Patterns fetched from a transformers model repo: configs, tokenizer files and safetensors weights only.
HF_MODEL_PATTERNS = ["*.json", "*.txt", "*.safetensors"]


def is_local(weights: str | os.PathLike | None) -> bool:
    return weights is not None and Path(weights).expanduser().exists()


def _offline_env() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "DIFFALIGN_OFFLINE")
    )


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """True when ``url``'s host accepts a TCP connection within ``timeout`` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _missing(scorer: str, what: str, hint: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"{scorer}: {what} not found on this machine and cannot be downloaded; {hint}"
    )


def hub_dir(
    repo_id: str, *, scorer: str, patterns: list[str] | None = None, metric: str | None = None
) -> Path:
    """Local snapshot directory of hub repo ``repo_id`` (from the cache, else downloaded)."""
    from huggingface_hub import snapshot_download

    patterns = patterns or HF_MODEL_PATTERNS
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001, S110 -- not cached (the error class varies across huggingface_hub versions)
        pass
    hint = (
        f"run `hf download {repo_id} --local-dir DIR` where there is network, copy DIR here and pass "
        f"weights=DIR (CLI: --metric {metric or scorer}=DIR), or fill the Hugging Face cache (HF_HOME)."
    )
    if _offline_env() or not _reachable(_hub_endpoint()):
        raise _missing(scorer, f"weights {repo_id!r}", hint)
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 -- network errors, gated or missing repos: all become one line
        raise _missing(scorer, f"weights {repo_id!r} ({type(exc).__name__})", hint) from None
    return path


def hub_file(
    repo_id: str,
    filename: str,
    *,
    scorer: str,
    metric: str | None = None,
    repo_type: str | None = None,
    hint: str | None = None,
) -> Path:
    """Local path of ``filename`` in hub repo ``repo_id`` (from the cache, else downloaded)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, local_files_only=True))
    except Exception:  # noqa: BLE001, S110 -- not cached (the error class varies across huggingface_hub versions)
        pass
    prefix = "datasets/" if repo_type == "dataset" else ""
    hint = hint or (
        f"download {filename} from https://huggingface.co/{prefix}{repo_id} where there is network and pass its path "
        f"as weights=PATH (CLI: --metric {metric or scorer}=PATH), or fill the Hugging Face cache (HF_HOME)."
    )
    if _offline_env() or not _reachable(_hub_endpoint()):
        raise _missing(scorer, f"{repo_id}/{filename}", hint)
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type))
    except Exception as exc:  # noqa: BLE001 -- any download failure becomes one line
        raise _missing(scorer, f"{repo_id}/{filename} ({type(exc).__name__})", hint) from None


def cache_dir() -> Path:
    """``$DIFFALIGN_CACHE`` or ``~/.cache/diffalign``: where non-hub files (the aesthetic head) are kept."""
    return Path(os.environ.get("DIFFALIGN_CACHE", Path.home() / ".cache" / "diffalign")).expanduser()


def url_file(url: str, filename: str, *, scorer: str, metric: str | None = None) -> Path:
    """``cache_dir()/scorer/filename``, downloaded from ``url`` when absent."""
    target = cache_dir() / scorer / filename
    if target.is_file():
        return target
    hint = f"download {url} where there is network and put it at {target} (or pass weights=PATH, CLI: --metric {metric or scorer}=PATH)."
    if _offline_env() or not _reachable(url):
        raise _missing(scorer, f"{filename!r}", hint)
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as exc:  # noqa: BLE001 -- any download failure becomes one line
        raise _missing(scorer, f"{filename!r} ({type(exc).__name__})", hint) from None
    return target


def load_state_dict(path: str | os.PathLike) -> dict:
    """A state dict from ``.safetensors`` or a torch checkpoint, always with ``weights_only=True``."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)
