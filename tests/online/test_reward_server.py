"""The reward server (diffalign.online.reward_server): a scorer behind HTTP/JSON, scored through RemoteScorer.

- Remote scores equal in-process scores exactly (PNG is lossless, floats round-trip through JSON), for PIL
  lists and arrays, across request batches; ``Rewards`` with a ``url`` term equals the in-process ``Rewards``.
- Bad requests get a 4xx with a one-line JSON error (malformed JSON, missing fields, length mismatch, not a
  PNG, a prompt the scorer rejects, an oversized body); an unreachable server is a one-line RewardServerError
  naming the URL, after the retries.
- The command line serves a scorer until Ctrl-C.
- Spec parsing of remote terms (dict and ``name:w@url`` string forms), and their one-line errors.

Every server here is the toy oracle (``load("toy")``, no weights) in a background thread on a free port.
"""

import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from diffalign.online import Rewards, RewardSpec
from diffalign.online.reward_server import (
    RemoteScorer,
    RewardServer,
    RewardServerError,
    decode_png,
    encode_png,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_batch():
    from PIL import Image

    from diffalign.toy.shapes import render_batch, sample_captions

    captions = sample_captions(6, seed=1)
    images, _ = render_batch(captions, seed=1)
    return [Image.fromarray(im) for im in images], captions


@pytest.fixture(scope="module")
def toy_scorer():
    from diffalign.evaluators import load

    return load("toy")


@pytest.fixture(scope="module")
def server(toy_scorer):
    with RewardServer(toy_scorer, max_bytes=2**20) as srv:
        yield srv


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ exact scores
def test_png_round_trip_is_lossless(toy_batch):
    images, _ = toy_batch
    for im in images:
        back = decode_png(encode_png(im))
        assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(im))


def test_remote_scores_equal_in_process_scores(server, toy_scorer, toy_batch):
    images, captions = toy_batch
    local = toy_scorer.score(images, captions).numpy()
    remote = RemoteScorer(server.url, timeout=10).score(images, captions)
    assert remote.dtype == np.float32 and remote.shape == (6,)
    assert np.array_equal(remote, local) and local.std() > 0
    # several requests (batch_size), a uint8 array, one prompt for all: all exactly the local scores
    arr = np.stack([np.asarray(im) for im in images])
    np.testing.assert_array_equal(RemoteScorer(server.url, batch_size=4).score(arr, captions), local)
    one = RemoteScorer(server.url).score(images[:3], captions[0])
    np.testing.assert_array_equal(one, toy_scorer.score(images[:3], captions[0]).numpy())
    assert RemoteScorer(server.url).score([], []).shape == (0,)
    assert RemoteScorer(server.url + "/").health() == {"metric": "toy", "ok": True}


def test_rewards_with_a_url_term_equal_in_process_rewards(server, toy_batch):
    images, captions = toy_batch
    total, per = Rewards({"toy": 0.5}, chunk_size=4)(images, captions)
    remote = Rewards({"toy": {"weight": 0.5, "url": server.url, "timeout": 10, "retries": 1}}, chunk_size=4)
    assert remote.scorers["toy"].url == server.url
    total_r, per_r = remote(images, captions)
    assert torch.equal(total_r, total) and torch.equal(per_r["toy"], per["toy"])
    total_s, _ = Rewards(f"toy:0.5@{server.url}")(images, captions)
    assert torch.equal(total_s, total)


# ---------------------------------------------------------------------------------------------- errors
def _one_line_error(status, payload, expected_status, match):
    assert status == expected_status, payload
    assert set(payload) == {"error"} and "\n" not in payload["error"] and match in payload["error"], payload


@pytest.mark.parametrize(
    "body, status, match",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"images": []}).encode(), 400, "'prompts'"),
        (json.dumps({"prompts": [1], "images": ["x"]}).encode(), 400, "list of strings"),
        (json.dumps({"prompts": ["a", "b"], "images": ["x"]}).encode(), 400, "1 images for 2 prompts"),
        (json.dumps({"prompts": ["a"], "images": ["@@@"]}).encode(), 400, "images[0]: not base64"),
        (json.dumps({"prompts": ["a"], "images": ["aGVsbG8="]}).encode(), 400, "images[0]: not a PNG"),
    ],
)
def test_malformed_requests_get_a_one_line_400(server, body, status, match):
    _one_line_error(*_post(server.url + "/score", body), status, match)


def test_scorer_errors_and_limits(server, toy_batch):
    images, _ = toy_batch
    # the toy oracle rejects a prompt that is not a toy caption: 400, and RemoteScorer raises it in one line
    body = json.dumps({"prompts": ["a photo of a dog"], "images": [encode_png(images[0])]}).encode()
    _one_line_error(*_post(server.url + "/score", body), 400, "ValueError")
    with pytest.raises(RewardServerError, match="HTTP 400") as info:
        RemoteScorer(server.url).score(images[:1], ["a photo of a dog"])
    assert server.url in str(info.value) and "\n" not in str(info.value)
    # over max_bytes (1 MiB here): 413, from the raw request and through RemoteScorer
    big = json.dumps({"prompts": ["a"], "images": ["A" * (2**20 + 4)]}).encode()
    _one_line_error(*_post(server.url + "/score", big), 413, "over this server's limit")
    with pytest.raises(RewardServerError, match="413"):
        noise = np.random.default_rng(0).integers(0, 256, (1, 1024, 1024, 3), dtype=np.uint8)  # ~3 MiB PNG
        RemoteScorer(server.url).score(noise, ["a"])
    # unknown path and wrong method
    request = urllib.request.Request(server.url + "/nope")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url + "/score", timeout=10)
    assert info.value.code == 405
    # the client checks lengths before sending, like the local scorers
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        RemoteScorer(server.url).score(images[:3], ["a", "b"])


def test_a_server_of_another_metric_is_refused(toy_scorer, toy_batch):
    images, captions = toy_batch
    with RewardServer(toy_scorer, name="pickscore") as srv, pytest.raises(
        RewardServerError, match="serves 'pickscore', not 'toy'"
    ):
        Rewards({"toy": {"url": srv.url}})(images, captions)


def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(RewardServerError, match="unreachable after 2 attempt") as info:
        RemoteScorer(url, timeout=2, retries=1).score(np.zeros((1, 8, 8, 3), np.uint8), ["a"])
    assert url in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_server_stops_and_frees_its_port(toy_scorer):
    srv = RewardServer(toy_scorer).start()
    assert RemoteScorer(srv.url).health()["ok"]
    srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(RewardServerError, match="unreachable"):
        RemoteScorer(srv.url, retries=0, timeout=2).health()
    RewardServer(toy_scorer).stop()  # never started: stop does not hang


def test_command_line_serves_until_interrupted(toy_batch):
    import signal
    import subprocess
    import sys

    images, captions = toy_batch
    # launched with SIGINT ignored, as a background job of a script is (and as a pytest run may leave it): the
    # server still stops on Ctrl-C
    proc = subprocess.Popen([sys.executable, "-m", "diffalign.online.reward_server", "--metric", "toy",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        assert line.startswith("reward server: toy on cpu at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        total, _ = Rewards(f"toy@{url}")(images, captions)
        assert torch.equal(total, Rewards("toy")(images, captions)[0])
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=20)
        proc.stdout.close()
    assert rc == 0


# ------------------------------------------------------------------------------------------ spec parsing
def test_remote_terms_in_the_spec():
    spec = RewardSpec.parse("pickscore:1.5@http://gpu:18085/,toy:0.5")
    assert spec.terms[0].url == "http://gpu:18085/" and spec.terms[0].weight == 1.5
    assert spec.terms[1].url is None and spec.weights == {"pickscore": 1.5, "toy": 0.5}
    assert RewardSpec.parse("pickscore@http://gpu:18085").terms[0].weight == 1.0
    again = RewardSpec.parse(str(RewardSpec.parse({"pickscore": {"weight": 2, "url": "http://gpu:1"}})))
    assert again.terms[0].url == "http://gpu:1" and again.terms[0].weight == 2.0


@pytest.mark.parametrize(
    "spec, match",
    [
        ("pickscore@http://gpu:18085:1.0", "not of the form"),  # name@url:weight is ambiguous: refused
        ("pickscore@gpu:18085", "not of the form"),
        ({"pickscore": {"url": "ftp://gpu"}}, "not of the form"),
        ({"pickscore": {"url": "http://gpu:1", "weights": "/ckpt"}}, "belong to that server"),
        ({"toy": {"url": "http://gpu:1", "taste_weight": 0.0}}, "taste_weight"),
    ],
)
def test_remote_spec_errors_are_one_line(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        RewardSpec.parse(spec)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="belong to that server"):
        RewardSpec.parse("clip@http://gpu:1", weights={"clip": "/x"})
