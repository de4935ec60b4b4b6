"""A reward scorer in another process or on another machine, over HTTP with JSON (never pickle).

A scorer too big for the trainer's process (PickScore or HPSv2.1 on their own GPU, or shared by several
trainers) runs behind a :class:`RewardServer`; the trainer scores through a :class:`RemoteScorer`, which has
the scorers' interface, so :class:`~diffalign.online.rewards.Rewards` uses it for a reward term whose options
hold a ``url``::

    python -m diffalign.online.reward_server --metric pickscore --device cuda --host 0.0.0.0 --port 18085
    rewards = Rewards({"pickscore": {"weight": 1.0, "url": "http://gpu-box:18085"}})      # in the trainer

    with RewardServer(diffalign.evaluators.load("toy")) as server:                        # in a thread
        RemoteScorer(server.url).score(images, prompts)          # float32 (N,), equal to the local scores

Wire format (HTTP/1.0, UTF-8 JSON bodies, ``Content-Type: application/json``):

- ``POST /score`` with body ``{"prompts": [str, ...], "images": [str, ...]}``: ``images[i]`` is the standard
  base64 (RFC 4648 §4, with padding, no line breaks) of a PNG file holding image ``i`` as 8-bit RGB;
  ``prompts[i]`` is its prompt; both lists have the same length N (N = 0 is allowed). The request must carry
  ``Content-Length`` (no chunked bodies). Answer ``200`` with ``{"scores": [float, ...], "metric": name}``:
  N raw scores of the served scorer, higher is better, each the float32 score written as a JSON number
  (Python's ``repr`` of the float64 widening, so it reads back to the same float32 exactly); a non-finite
  score is written as ``NaN``, ``Infinity`` or ``-Infinity`` (Python's ``json`` extension). PNG is lossless,
  so the server scores the very pixels the client has and remote scores equal in-process scores exactly.
- ``GET /health``: ``200`` with ``{"metric": name, "ok": true}``.
- Errors: a status ``4xx``/``5xx`` with body ``{"error": "one line"}``: ``400`` malformed JSON, a missing or
  mistyped field, lists of different lengths, an image that is not base64 or not a PNG, or a ``ValueError``/
  ``TypeError`` from the scorer (e.g. a prompt the toy oracle does not know); ``404`` unknown path; ``405``
  wrong method; ``411`` no ``Content-Length``; ``413`` a body over the server's ``max_bytes`` (read and
  dropped, not parsed); ``500`` any other failure of the scorer (its traceback goes to the server's log).

The server decodes requests in parallel (one thread each) and runs the scorer under a lock, one batch at a
time. It has no authentication and no TLS: bind it to ``127.0.0.1`` (the default) or a trusted network.
Request bodies are parsed only as JSON and PNG; nothing is unpickled.

:class:`RemoteScorer` retries a request that got no answer for want of a connection (connection refused or
reset, unknown host, a connect timeout, the server closing the connection before answering, or a
``502``/``503``/``504`` from a proxy) ``retries``
times with backoff 0.1 s, 0.2 s, 0.4 s, ... (at most 2 s); a read timeout (the server is scoring but slowly)
and every other error status are not retried. Failures raise :class:`RewardServerError` (a ``RuntimeError``)
with one line naming the URL.

Importing this module loads torch (through the :mod:`diffalign.online` package) but no evaluator; the command
line loads the scorer with :func:`diffalign.evaluators.load`.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import logging
import signal
import socket
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_PORT", "RemoteScorer", "RewardServer", "RewardServerError",
           "decode_png", "encode_png"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 18085
DEFAULT_MAX_BYTES = 256 * 2**20  # 256 MiB: a 1024x1024 image is ~1-3 MiB as PNG, so a chunk of 64 fits
_RETRY_STATUS = (502, 503, 504)


class RewardServerError(RuntimeError):
    """A reward server could not be reached or answered with an error (one line naming its URL)."""


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_png(image) -> str:
    """A PIL image as the base64 of its PNG file (8-bit RGB), the wire form of one image."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str):
    """The inverse of :func:`encode_png`: an RGB PIL image (``ValueError`` if not base64 or not a PNG)."""
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])
        image.load()
    except Image.DecompressionBombError as exc:
        raise ValueError(_one_line(exc)) from None
    except Exception:  # noqa: BLE001  (PIL raises many kinds for corrupt files)
        raise ValueError("not a PNG file") from None
    return image if image.mode == "RGB" else image.convert("RGB")


# ------------------------------------------------------------------------------------------------- server
class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "diffalign-reward-server/1"
    timeout = 120  # seconds a socket read or write may stall

    def _discard_body(self, length: int, limit: int) -> None:
        """Read and drop a refused body (when not too large), so that a client still sending it gets the
        error answer rather than a reset connection."""
        if length > limit:
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 2**20))
            if not chunk:
                return
            length -= len(chunk)

    def log_message(self, format, *args):  # BaseHTTPRequestHandler's signature
        if self.server.owner.log_requests:
            logger.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, payload: dict, close: bool = False) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        self._send_json(status, {"error": _one_line(message)}, close=close)

    def _path(self) -> str:
        return urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"

    def do_GET(self):
        path = self._path()
        if path == "/health":
            self._send_json(200, {"metric": self.server.owner.name, "ok": True})
        elif path == "/score":
            self._error(405, "use POST /score with a JSON body {\"prompts\": [...], \"images\": [...]}.")
        else:
            self._error(404, f"no such path {path!r}; the paths are POST /score and GET /health.")

    def do_POST(self):
        path = self._path()
        if path == "/health":
            self._error(405, "use GET /health.")
            return
        if path != "/score":
            self._error(404, f"no such path {path!r}; the paths are POST /score and GET /health.")
            return
        owner = self.server.owner
        try:
            length = self.headers.get("Content-Length")
            if length is None or self.headers.get("Transfer-Encoding"):  # nothing can be read safely
                raise _HTTPError(411, "a Content-Length header is required (chunked bodies are not accepted).")
            try:
                length = int(length)
            except ValueError:
                raise _HTTPError(400, f"bad Content-Length {length!r}.") from None
            if length < 0:
                raise _HTTPError(400, f"bad Content-Length {length}.")
            if length > owner.max_bytes:
                self._discard_body(length, limit=16 * owner.max_bytes)
                raise _HTTPError(413, f"request body of {length} bytes is over this server's limit of "
                                      f"{owner.max_bytes} bytes; send fewer images per request.")
            body = self.rfile.read(length)
            if len(body) != length:
                raise _HTTPError(400, f"request body ended after {len(body)} of {length} bytes.")
            images, prompts = _parse_score_request(body)
            scores = owner.score(images, prompts)
        except _HTTPError as exc:
            self._error(exc.status, str(exc), close=exc.status in (411, 413))
            return
        except (ValueError, TypeError) as exc:
            self._error(400, f"{type(exc).__name__}: {exc}")  # the scorer's own message names it
            return
        except Exception as exc:  # noqa: BLE001  (the client gets one line, the log the traceback)
            logger.error("reward server %s: scoring failed:\n%s", owner.name, traceback.format_exc())
            self._error(500, f"{owner.name}: scoring failed: {type(exc).__name__}: {exc}")
            return
        self._send_json(200, {"scores": scores, "metric": owner.name})


def _parse_score_request(body: bytes) -> tuple[list, list[str]]:
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _HTTPError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(payload, dict):
        raise _HTTPError(400, f"the body must be a JSON object {{\"prompts\": [...], \"images\": [...]}}; "
                              f"got {type(payload).__name__}.")
    for key in ("prompts", "images"):
        if key not in payload:
            raise _HTTPError(400, f"the body has no {key!r} field; send {{\"prompts\": [...], \"images\": [...]}}.")
        value = payload[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _HTTPError(400, f"{key!r} must be a list of strings.")
    prompts, encoded = payload["prompts"], payload["images"]
    if len(prompts) != len(encoded):
        raise _HTTPError(400, f"got {len(encoded)} images for {len(prompts)} prompts; send one prompt per image.")
    images = []
    for i, data in enumerate(encoded):
        try:
            images.append(decode_png(data))
        except ValueError as exc:
            raise _HTTPError(400, f"images[{i}]: {exc}") from None
    return images, prompts


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: RewardServer


class _Server6(_Server):
    address_family = socket.AF_INET6


class RewardServer:
    """Serve ``scorer.score(images, prompts)`` over HTTP (the wire format is in the module docstring).

    The socket is bound when the server is built (so ``port=0`` picks a free port and :attr:`url` is known at
    once); :meth:`start` serves from a daemon thread, :meth:`serve_forever` from the calling thread.

    Args:
        scorer: anything with ``score(images: list[PIL.Image], prompts: list[str]) -> (N,)`` (array or tensor).
        host: the address to bind; ``"127.0.0.1"`` (default) for this machine only, ``"0.0.0.0"`` for every
            interface (the server has no authentication), ``"::"`` for IPv6.
        port: the TCP port; 0 picks a free one.
        name: the metric name reported by ``/health`` and in every answer (default ``scorer.name``).
        max_bytes: the largest request body accepted (larger ones are dropped unparsed with ``413``).
        log_requests: log one line per request (``logging`` at INFO) instead of staying quiet.

    Attributes:
        url: ``http://host:port`` to give :class:`RemoteScorer` (for a wildcard bind, this machine's host name).
    """

    def __init__(
        self,
        scorer,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        log_requests: bool = False,
    ):
        if not callable(getattr(scorer, "score", None)):
            raise TypeError(f"scorer must have a score(images, prompts) method; got {type(scorer).__name__}.")
        if int(max_bytes) < 1:
            raise ValueError(f"max_bytes must be >= 1; got {max_bytes}.")
        self.scorer = scorer
        self.name = str(name or getattr(scorer, "name", None) or type(scorer).__name__)
        self.max_bytes = int(max_bytes)
        self.log_requests = bool(log_requests)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        server_cls = _Server6 if ":" in host else _Server
        try:
            self._httpd = server_cls((host, int(port)), _Handler)
        except OSError as exc:
            raise OSError(f"reward server: cannot bind {host}:{port}: {exc.strerror or exc}") from None
        self._httpd.owner = self
        bound_host, bound_port = self._httpd.server_address[:2]
        if bound_host in ("0.0.0.0", "::", ""):
            bound_host = socket.gethostname()
        self.host, self.port = bound_host, int(bound_port)
        self.url = f"http://[{bound_host}]:{self.port}" if ":" in bound_host else f"http://{bound_host}:{self.port}"

    def __repr__(self) -> str:
        return f"RewardServer({self.name!r}, url={self.url!r})"

    def score(self, images: list, prompts: list[str]) -> list[float]:
        """Run the scorer (under the lock) and return N Python floats (float32 values widened)."""
        if not images:
            return []
        with self._lock:
            scores = self.scorer.score(images, prompts)
        if hasattr(scores, "detach"):  # a torch tensor
            scores = scores.detach().float().cpu().numpy()
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if scores.size != len(images):
            raise RuntimeError(f"the scorer returned {scores.size} scores for {len(images)} images.")
        return [float(s) for s in scores]

    def start(self) -> RewardServer:
        """Serve from a daemon thread; returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                name=f"reward-server-{self.port}", daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from the calling thread until :meth:`stop` (from another thread) or ``KeyboardInterrupt``."""
        self._thread = threading.current_thread()
        try:
            self._httpd.serve_forever(poll_interval=0.1)
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._httpd.shutdown()
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------- client
class RemoteScorer:
    """A scorer whose :meth:`score` runs on a :class:`RewardServer` (``python -m diffalign.online.reward_server``).

    Args:
        url: the server's ``http://host:port`` (a path prefix is kept: ``/score`` and ``/health`` are appended).
        timeout: seconds to wait for the connection and for each answer (scoring included).
        retries: extra tries for a request that did not reach the server (see the module docstring).
        batch_size: images per request (bounds the request size); ``None`` = all in one request.
        expect_metric: if given, an answer from a server that serves another metric is an error (a reward
            term ``"pickscore"`` pointed at an HPS server).

    Attributes:
        name: ``expect_metric`` or ``"remote"``; url: the server URL without a trailing slash.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        batch_size: int | None = 64,
        expect_metric: str | None = None,
    ):
        self.url = check_url(url)
        if not float(timeout) > 0:
            raise ValueError(f"timeout must be > 0 seconds; got {timeout}.")
        if int(retries) < 0:
            raise ValueError(f"retries must be >= 0; got {retries}.")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1 or None; got {batch_size}.")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.expect_metric = expect_metric
        self.name = expect_metric or "remote"

    def __repr__(self) -> str:
        return f"RemoteScorer({self.url!r}, metric={self.expect_metric!r})"

    def health(self) -> dict:
        """``GET /health``: ``{"metric": name, "ok": true}``."""
        return self._request("/health", None)

    def score(self, images, prompts: Sequence[str] | str) -> np.ndarray:
        """Score ``images`` against ``prompts`` on the server.

        Args:
            images: N images (list of PIL, uint8 (N, H, W, 3), or float (N, 3, H, W) / (N, H, W, 3) in [0, 1],
                as :func:`~diffalign.online.rewards.to_pil_images` takes); sent as PNG.
            prompts: N prompts, or one prompt for all.

        Returns:
            float32 array (N,), the server's raw scores.

        Raises:
            ValueError: images and prompts of different lengths (before anything is sent).
            RewardServerError: the server is unreachable, answers with an error, or serves another metric.
        """
        from diffalign.online.rewards import to_pil_images

        images = to_pil_images(images)
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        prompts = [str(p) for p in prompts]
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one prompt per image.")
        step = self.batch_size or max(len(images), 1)
        out = []
        for start in range(0, len(images), step):
            ims, ps = images[start:start + step], prompts[start:start + step]
            payload = {"prompts": ps, "images": [encode_png(im) for im in ims]}
            answer = self._request("/score", payload)
            scores = answer.get("scores")
            if not isinstance(scores, list) or len(scores) != len(ims) or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores
            ):
                got = f"{len(scores)} scores" if isinstance(scores, list) else f"scores={_one_line(scores, 80)}"
                raise RewardServerError(f"reward server {self.url}: expected {len(ims)} numbers in 'scores', "
                                        f"got {got}.")
            out.append(np.asarray(scores, dtype=np.float32))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    __call__ = score

    def _request(self, path: str, payload: dict | None) -> dict:
        endpoint = self.url + path
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        last = ""
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(0.1 * 2 ** (attempt - 1), 2.0))
            request = urllib.request.Request(endpoint, data=data, headers=headers,
                                             method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                break
            except urllib.error.HTTPError as exc:
                message = _error_message(exc)
                if exc.code in _RETRY_STATUS:
                    last = f"HTTP {exc.code}: {message}"
                    continue
                raise RewardServerError(f"reward server {self.url}: HTTP {exc.code}: {message}") from None
            except urllib.error.URLError as exc:  # not connected: refused, unknown host, connect timeout
                last = _one_line(getattr(exc.reason, "strerror", None) or exc.reason)
            except (http.client.RemoteDisconnected, ConnectionError) as exc:  # closed before answering
                last = _one_line(f"{type(exc).__name__}: {exc}")
            except TimeoutError:  # connected, but no answer in time: the server is busy, do not pile on
                raise RewardServerError(
                    f"reward server {self.url}: no answer within {self.timeout:g} s (timeout=); the scorer may "
                    "be slow or stuck."
                ) from None
            except (http.client.HTTPException, OSError) as exc:
                raise RewardServerError(f"reward server {self.url}: {type(exc).__name__}: "
                                        f"{_one_line(exc)}") from None
        else:
            raise RewardServerError(
                f"reward server {self.url} is unreachable after {attempts} attempt(s): {last}; start one with "
                "'python -m diffalign.online.reward_server --metric NAME --port PORT'."
            )
        try:
            answer = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RewardServerError(f"reward server {self.url}: the answer to {path} is not JSON: "
                                    f"{_one_line(body[:200].decode('utf-8', 'replace'))}") from None
        if not isinstance(answer, dict):
            raise RewardServerError(f"reward server {self.url}: the answer to {path} is not a JSON object.")
        metric = answer.get("metric")
        if self.expect_metric is not None and metric is not None and metric != self.expect_metric:
            raise RewardServerError(f"reward server {self.url} serves {metric!r}, not {self.expect_metric!r}; "
                                    "point the reward term at a server of that metric.")
        return answer


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read()
    except Exception:  # noqa: BLE001
        raw = b""
    try:
        message = json.loads(raw.decode("utf-8"))["error"]
    except Exception:  # noqa: BLE001  (not our JSON: a proxy's page, say)
        message = raw[:200].decode("utf-8", "replace") or exc.reason
    return _one_line(message)


def check_url(url) -> str:
    """``url`` without a trailing slash; ``ValueError`` (one line) unless it is ``http(s)://host[:port][/path]``."""
    if not isinstance(url, str):
        raise ValueError(  # noqa: TRY004  (spec errors are ValueErrors)
            f"reward server url must be a string 'http://host:port'; got {type(url).__name__}.")
    url = url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment:
        raise ValueError(f"reward server url {url!r} is not of the form 'http://host:port'.")
    return url


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m diffalign.online.reward_server",
        description="Serve a diffalign.evaluators scorer over HTTP/JSON for Rewards({name: {'url': ...}}).",
    )
    parser.add_argument("--metric", required=True, help="scorer name for diffalign.evaluators.load (pickscore, "
                        "hpsv2.1, imagereward, clip, aesthetic, toy, ...)")
    parser.add_argument("--weights", default=None, help="hub id, local folder or file (default: official)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="fp32 (default), fp16 or bf16")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface; the "
                        "server has no authentication)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_BYTES / 2**20,
                        help="largest request body in MiB")
    parser.add_argument("--log-requests", action="store_true", help="log one line per request")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO if args.log_requests else logging.WARNING,
                        format="%(asctime)s %(message)s")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from diffalign.evaluators import load

    try:
        scorer = load(args.metric, weights=args.weights, device=device, dtype=args.dtype,
                      batch_size=args.batch_size)
        server = RewardServer(scorer, args.host, args.port, name=args.metric,
                              max_bytes=int(args.max_mb * 2**20), log_requests=args.log_requests)
    except (ValueError, OSError, RuntimeError) as exc:  # RuntimeError: WeightsNotFoundError
        print(f"error: {_one_line(exc)}", flush=True)
        return 2
    # Ctrl-C and `kill` stop it cleanly even when the launcher left SIGINT ignored (a background job of a
    # non-interactive shell, or a parent that ignores it: the child inherits the disposition)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"reward server: {args.metric} on {device} at {server.url} (bound to {args.host}:{server.port}); "
          "Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
