"""Remote rewards over real HTTP on 127.0.0.1 (no network): the reward-server pickle protocol (GenEval, DeQA) against a
server written here from the protocol, the restricted unpickler, bounded failures, VLM judges against a loopback
OpenAI-compatible server, `rewards.py serve` under load and faults, reward options, and prompt metadata end to end
through train.py --algo grpo and evaluate.py with 1 and 2 processes (forked after import: no interpreter start-up)."""
import base64
import contextlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import io
import json
import multiprocessing
import os
from pathlib import Path
import pickle
import socket
import threading
import time

import numpy as np
from PIL import Image
import pytest
import torch

import evaluate
import rewards
import train
from conftest import ROOT

RELEASE = threading.Event()                               # set at the end of the module: stalled handlers return


# ----------------------------------------------------------------------------------------- loopback servers

@contextlib.contextmanager
def loopback(respond):
    """A threaded HTTP server on 127.0.0.1: respond(path, headers, body) -> (status, bytes). Yields its url."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            status, data = respond(self.path, self.headers, self.rfile.read(int(self.headers["Content-Length"])))
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:                                                   # the client gave up (a timeout test)
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def geneval_stub(log: list):
    """reward-server's app_geneval, from its protocol: pickled request in, pickled answer out. Scores each image by
    its DECODED pixels (so the client's JPEG bytes matter) and its metadata's "id" (so metadata must travel)."""
    def respond(path, headers, body):
        request = pickle.loads(body)                                          # our own client: trusted here
        log.append(request)
        pixels = [np.asarray(Image.open(io.BytesIO(b), formats=["JPEG"])) for b in request["images"]]
        ids = [m["id"] for m in request["meta_datas"]]
        answer = {"scores": [float(p.mean() / 255) for p in pixels], "rewards": [float(i % 2) for i in ids],
                  "strict_rewards": [float(i % 3 == 0) for i in ids], "group_rewards": {}, "group_strict_rewards": {}}
        return 200, pickle.dumps(answer)
    return respond


def uint8(images: torch.Tensor) -> list[np.ndarray]:
    return list((images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def jpeg75(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------- reward-server protocol

def test_geneval_client_sends_jpeg_and_metadata_exactly_and_returns_the_server_scores():
    n = 130                                                                   # Flow-GRPO splits it 44 + 43 + 43
    images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    metadata = [{"id": i, "tag": "counting", "include": [{"class": "cat", "count": i % 4 + 1}], "prompt": f"p{i}",
                 "extra": {"kept": [i, "x"]}} for i in range(n)]
    log = []
    with loopback(geneval_stub(log)) as url:
        train_reward = rewards.make_reward("geneval_server", url=url, timeout="5", retries="0")
        scores = train_reward(images, [f"p{i}" for i in range(n)], metadata)
        assert [len(r["images"]) for r in log] == [44, 43, 43] and all(r["only_strict"] is True for r in log)
        assert all(set(r) == {"images", "meta_datas", "only_strict"} for r in log)
        sent = [b for r in log for b in r["images"]]
        assert sent == [jpeg75(a) for a in uint8(images)]                     # Pillow's default quality is 75
        assert [m for r in log for m in r["meta_datas"]] == metadata          # every field, as it was
        decoded = torch.tensor([np.asarray(Image.open(io.BytesIO(b))).mean() / 255 for b in sent], dtype=torch.float32)
        assert scores.dtype == torch.float32 and torch.equal(scores, decoded)  # training: `scores`
        assert train_reward.details == {}

        log.clear()
        evaluation = rewards.make_reward("geneval_server", evaluation=True, url=url)
        accuracy = evaluation(images[:5], ["p"] * 5, metadata[:5])
        assert [r["only_strict"] for r in log] == [False]
        assert accuracy.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]                # evaluation: `rewards` (pass/fail)
        assert torch.equal(evaluation.details["score"], decoded[:5])
        assert evaluation.details["strict_accuracy"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_deqa_client_sends_images_only_and_scales_for_evaluation():
    log = []

    def respond(path, headers, body):
        request = pickle.loads(body)
        log.append(request)
        outputs = np.array([0.2 + 0.1 * i for i in range(len(request["images"]))], dtype=np.float32)
        return 200, pickle.dumps({"outputs": outputs})                       # a numeric numpy array is accepted

    with loopback(respond) as url:
        images = torch.rand(3, 3, 8, 8)
        scores = rewards.make_reward("deqa_server", url=url)(images, ["a", "b", "c"], None)
        paper = rewards.make_reward("deqa_server", evaluation=True, url=url)(images, ["a", "b", "c"], None)
    assert [set(r) for r in log] == [{"images"}, {"images"}]
    assert torch.allclose(scores, torch.tensor([0.2, 0.3, 0.4])) and torch.allclose(paper, 5 * scores)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_and_objects_but_reads_plain_data(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="refused to load posix.system"):
        rewards.safe_loads(pickle.dumps({"scores": [Evil(marker)]}))
    with pytest.raises(pickle.UnpicklingError, match="dtype object"):
        rewards.safe_loads(pickle.dumps({"scores": np.array([1, "a"], dtype=object)}))
    with pytest.raises(pickle.UnpicklingError, match="refused to load collections.OrderedDict"):
        rewards.safe_loads(pickle.dumps(__import__("collections").OrderedDict(a=1)))
    assert not marker.exists()
    plain = {"scores": [0.5, 1], "t": (1, "x", None, True), "s": {3}, "a": np.arange(3.0), "n": np.float64(2.5)}
    for protocol in (2, 4, 5):
        loaded = rewards.safe_loads(pickle.dumps(plain, protocol=protocol))
        assert loaded["scores"] == [0.5, 1] and np.array_equal(loaded["a"], plain["a"]) and loaded["n"] == 2.5
    numpy1 = pickle.dumps(np.arange(2.0), protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert np.array_equal(rewards.safe_loads(numpy1), [0.0, 1.0])          # what a numpy-1 server sends

    with loopback(lambda path, headers, body: (200, pickle.dumps({"outputs": [Evil(marker)]}))) as url:
        with pytest.raises(rewards.RewardError, match=f"reward server at {url} answered something we refuse"):
            rewards.make_reward("deqa_server", url=url, retries=0)(torch.rand(1, 3, 8, 8), ["a"])
    assert not marker.exists()


def test_down_stalled_and_failing_servers_end_in_a_clear_error_within_the_bound():
    with socket.socket() as s:                                                # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    image, meta = torch.rand(1, 3, 8, 8), [{"id": 1, "tag": "x", "include": [], "prompt": "a"}]
    start = time.monotonic()
    with pytest.raises(rewards.RewardError, match=f"reward server at {down} failed after 3 attempts.*reward-server"):
        rewards.make_reward("geneval_server", url=down, retries=2, backoff=0.05)(image, ["a"], meta)
    assert time.monotonic() - start < 1.0                                   # refused at once: the backoff only

    def stall(path, headers, body):
        RELEASE.wait(10)
        return 200, b""
    with loopback(stall) as url:
        start = time.monotonic()
        with pytest.raises(rewards.RewardError, match="failed after 2 attempts.*timed out"):
            rewards.make_reward("geneval_server", url=url, timeout=0.3, retries=1, backoff=0.05)(image, ["a"], meta)
        assert 0.6 <= time.monotonic() - start < 2.0                         # 2 x 0.3 s + 0.05 s

    calls = []

    def fail(path, headers, body):
        calls.append(1)
        return 500, b"Traceback (most recent call last):\n  File app_geneval.py\nValueError: detector exploded\n"
    with loopback(fail) as url:
        with pytest.raises(rewards.RewardError, match=r"failed after 3 attempts \(HTTP 500: ValueError: detector exp"):
            rewards.make_reward("geneval_server", url=url, retries=2, backoff=0.01)(image, ["a"], meta)
    assert len(calls) == 3                                                    # bounded: 1 + retries


# ----------------------------------------------------------------------------------------- VLM judge

class Judge:
    """An OpenAI-compatible chat server: canned answers per prompt (one per attempt); records the peak in flight."""

    def __init__(self, answers: dict, delay: float = 0.0):
        self.answers, self.delay, self.lock = answers, delay, threading.Lock()
        self.requests, self.in_flight, self.peak = [], 0, 0

    def __call__(self, path, headers, body):
        request = json.loads(body)
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            prompt = request["messages"][0]["content"][1]["text"].removeprefix("Rate: ")
            attempt = sum(p == prompt for _, _, p, _ in self.requests)
            self.requests.append((path, dict(headers), prompt, request))
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
        canned = self.answers.get(prompt, ["Final Score: 3"])
        message = {"role": "assistant", "content": canned[min(attempt, len(canned) - 1)]}
        return 200, json.dumps({"choices": [{"index": 0, "message": message}]}).encode()


@pytest.fixture
def template(tmp_path) -> str:
    (tmp_path / "judge.txt").write_text("Rate: {prompt}")
    return str(tmp_path / "judge.txt")


def test_vlm_judge_parses_counts_unparseable_and_sends_what_the_judge_expects(template, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    judge = Judge({"good": ["Final Score: 4"], "half": ["thinking... Final Score: 2.5"],
                   "bad": ["I cannot rate this.", "Still no."], "late": ["hmm", "Final Score: 5"]})
    with loopback(judge) as url:
        options = dict(url=url + "/v1", model="judge-7b", template=template, pattern=r"Final Score:\s*([0-9.]+)",
                       size="24", api_key_env="MY_JUDGE_KEY")
        reward = rewards.make_reward("vlm_judge", max_unparseable="0.3", **options)
        scores = reward(torch.rand(4, 3, 16, 16), ["good", "half", "bad", "late"])
        parsed = [0.8, 0.5, 1.0]
        assert torch.allclose(scores, torch.tensor([0.8, 0.5, sum(parsed) / 3, 1.0]))   # unparseable: batch mean
        assert reward.details["unparseable"].tolist() == [0.0, 0.0, 1.0, 0.0]
        assert Counter(p for _, _, p, _ in judge.requests) == {"good": 1, "half": 1, "bad": 2, "late": 2}  # one retry
        path, headers, _, request = judge.requests[0]
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
        assert request["model"] == "judge-7b" and request["temperature"] == 0
        uri = request["messages"][0]["content"][0]["image_url"]["url"]
        assert uri.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (24, 24)   # resized

        with pytest.raises(rewards.RewardError, match=r"1 of 4 answers hold no score.*max_unparseable=0.1"):
            rewards.make_reward("vlm_judge", **options)(torch.rand(4, 3, 16, 16), ["good", "half", "bad", "late"])


def test_vlm_judge_concurrency_is_bounded_and_presets_ship_templates(template):
    judge = Judge({}, delay=0.1)
    with loopback(judge) as url:
        reward = rewards.make_reward("vlm_judge", url=url, model="m", template=template, pattern=r"Score: (\d)",
                                     concurrency=3, size=0)                   # size 0: as they are (8 px)
        assert torch.allclose(reward(torch.rand(12, 3, 8, 8), [f"p{i}" for i in range(12)]), torch.full((12,), 0.6))
        assert judge.peak == 3                                                # bounded, and really concurrent
        uri = judge.requests[0][3]["messages"][0]["content"][0]["image_url"]["url"]
        assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (8, 8)
        judge.requests.clear()
        unified = rewards.make_reward("unifiedreward", url=url)(torch.rand(1, 3, 8, 8), ["a red cube"])
        text = judge.requests[0][3]["messages"][0]["content"][1]["text"]
        assert "Text Caption: [a red cube]" in text and "Final Score:" in text
        assert unified.tolist() == [pytest.approx(0.6)]
    assert "<Score>" in (ROOT / "judges" / "qwenvl.txt").read_text()
    assert rewards.make_reward("qwenvl", url="http://127.0.0.1:9") is not None


# ----------------------------------------------------------------------------------------- our server

@pytest.fixture(scope="module")
def our_server():
    """`rewards.py serve`'s server in this process: brightness, JSON protocol; and a pickle one. 1.5 s socket timeout."""
    servers = {}
    for protocol in ("json", "pickle"):
        server = rewards.make_server("127.0.0.1", 0, protocol, max_body=1 << 20, timeout=1.5)
        server.reward, server.name = rewards.make_reward("brightness"), "brightness"
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers[protocol] = (server, f"http://127.0.0.1:{server.server_port}")
    yield {protocol: url for protocol, (_, url) in servers.items()}
    for server, _ in servers.values():
        server.shutdown()
        server.server_close()


def raw_post(url: str, body: bytes, length: int | None = None) -> tuple[int, bytes]:
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n"
                  .encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def test_our_server_answers_8_concurrent_clients_each_their_own_scores(our_server, capsys):
    local = rewards.make_reward("brightness")
    clients, requests_each, batch = 8, 4, 16
    results, errors = {}, []

    def client(c: int):
        try:
            remote = rewards.make_reward("remote", url=our_server["json"], timeout=10, retries=0)
            for k in range(requests_each):
                images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(100 * c + k))
                results[c, k] = (remote(images, [f"c{c}"] * batch), local(images, [""] * batch))
        except Exception as error:                                            # reported below
            errors.append(error)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    assert not errors and len(results) == clients * requests_each
    assert all(torch.equal(remote, expected) for remote, expected in results.values())
    with capsys.disabled():
        print(f"\n[load] {clients * requests_each} requests of {batch} 32px images, {clients} concurrent clients: "
              f"{wall:.2f} s wall")

    images = torch.rand(5, 3, 16, 16)                                       # reward-server protocol, our server
    through = rewards.make_reward("deqa_server", url=our_server["pickle"], retries=0)(images, list("abcde"))
    decoded = [np.asarray(Image.open(io.BytesIO(jpeg75(a)))).mean() / 255 for a in uint8(images)]
    assert torch.allclose(through, torch.tensor(decoded, dtype=torch.float32))


def test_a_stalled_half_body_does_not_block_others_and_is_dropped(our_server):
    port = int(our_server["json"].rsplit(":", 1)[1])
    stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
    stalled.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"{" * 10)   # then nothing
    start = time.monotonic()
    remote = rewards.make_reward("remote", url=our_server["json"], timeout=5, retries=0)
    assert remote(torch.ones(2, 3, 8, 8), ["a", "b"]).tolist() == [1.0, 1.0]
    assert time.monotonic() - start < 1.2                                   # not behind the stalled one (1.5 s)
    assert stalled.recv(100) == b""                                          # dropped after the socket timeout
    stalled.close()


def test_our_server_refuses_oversized_and_malformed_bodies(our_server, tmp_path):
    status, text = raw_post(our_server["json"], b"x" * 10, length=(1 << 20) + 1)
    assert status == 413 and b"over the limit" in text
    assert raw_post(our_server["json"], b"{not json")[0] == 400
    status, text = raw_post(our_server["pickle"], b"\x80\x04garbage")
    assert status == 400 and text.startswith(b"malformed request")
    marker = tmp_path / "pwned"
    status, text = raw_post(our_server["pickle"], pickle.dumps({"images": [Evil(marker)]}))
    assert status == 400 and b"refused to load posix.system" in text and not marker.exists()
    with pytest.raises(ValueError, match="--protocol pickle on --host 0.0.0.0"):
        rewards.make_server("0.0.0.0", 0, "pickle")


def test_serve_on_a_busy_port_fails_in_one_line_before_loading(monkeypatch, capsys):
    loaded = []
    monkeypatch.setitem(rewards.REWARDS, "brightness", lambda: loaded.append(1))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            rewards.main(["serve", "--reward", "brightness", "--port", str(port)])
    assert exit_.value.code == 2 and loaded == []
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith(f"rewards.py: error: cannot listen on 127.0.0.1:{port}")


def test_score_cli_on_a_wrong_size_image_is_one_line(tmp_path, capsys):
    Image.new("RGB", (512, 512), "white").save(tmp_path / "big.png")
    with pytest.raises(SystemExit) as exit_:
        rewards.main(["score", "--reward", "toy_ocr", "--prompt", 'a sign "hi"', str(tmp_path / "big.png")])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and error.count("\n") == 0 and "512" in error
    assert error.startswith("rewards.py: error:")


# ----------------------------------------------------------------------------------------- options

def test_reward_options_parse_convert_and_refuse():
    spec = "geneval_server.url=http://h:1/a,b,geneval_server.timeout=2.5,remote:deqa.retries=1"
    assert rewards.parse_reward_options(spec) == {"geneval_server": {"url": "http://h:1/a,b", "timeout": "2.5"},
                                                  "remote:deqa": {"retries": "1"}}
    with pytest.raises(ValueError, match="expected reward.option=value"):
        rewards.parse_reward_options("geneval_server=http://h")
    assert rewards.factory_options("remote:x", {"url": "u", "timeout": "2.5", "retries": "1"}, False) == \
        {"url": "u", "timeout": 2.5, "retries": 1}
    assert rewards.factory_options("geneval_server", {"url": "u"}, True)["evaluation"] is True
    for options, message in [({}, "reward 'remote' needs option 'url'"),
                             ({"url": "u", "ulr": "v"}, "reward 'remote' has no option 'ulr'; its options: url"),
                             ({"url": "u", "timeout": "soon"}, "option remote.timeout takes a float")]:
        with pytest.raises(ValueError, match=message):
            rewards.make_reward("remote", **options)
    with pytest.raises(ValueError, match="evaluation is not an option"):
        rewards.parse_reward_options("geneval_server.url=u,geneval_server.evaluation=true")
    with pytest.raises(ValueError, match="reward 'deqa_server' is not used"):
        rewards.check_reward_options({"deqa_server": {"url": "u"}}, ["geneval_server", "toy_ocr"])


@pytest.mark.parametrize("flags, message", [
    (["--reward", "remote"], "reward 'remote' needs option 'url'"),
    (["--reward", "toy_ocr", "--reward_options", "deqa_server.url=http://127.0.0.1:9"], "'deqa_server' is not used"),
    (["--task_rewards", "ocr=geneval_server", "--prompts", "ocr=toy/ocr_train.txt", "--reward_options",
      "geneval_server.url=http://127.0.0.1:9"], r"'geneval_server' needs each prompt's metadata.*'ocr'.*\.txt file"),
    (["--reward", "geneval_server", "--prompts", "ocr=toy/ocr_train.txt", "--reward_options",
      "geneval_server.url=http://127.0.0.1:9"], r"'geneval_server' needs each prompt's metadata.*'ocr'.*\.txt file"),
])
def test_train_refuses_bad_reward_setups_before_loading(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.setup(train.parse_config(["--algo", "grpo", *flags, "--out", str(tmp_path / "out")]), 0, 1,
                    torch.device("cpu"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    ({"rewards": "ocr=remote"}, "reward 'remote' needs option 'url'"),                  # issue 15: was a TypeError
    ({"rewards": "ocr=geneval_server", "reward_options": "geneval_server.url=u"}, "needs each prompt's metadata"),
    ({"rewards": "ocr=toy_ocr", "reward_options": "remote.url=u"}, "reward 'remote' is not used"),
])
def test_evaluate_refuses_bad_reward_setups_before_loading(flags, message):
    with pytest.raises(ValueError, match=message):
        evaluate.resolve_jobs(evaluate.EvalConfig(prompts=f"ocr={ROOT / 'toy' / 'ocr_test.txt'}", **flags))


# ----------------------------------------------------------------------------------------- prompt files

def test_read_prompts_keeps_every_field_and_names_file_and_line(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text('{"prompt": "a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}\n\n'
                    '{"prompt": "two dogs", "tag": "counting", "x": null}\n')
    prompts = train.read_prompts(good)
    assert prompts == ["a cat", "two dogs"] and all(isinstance(p, str) for p in prompts)
    assert prompts[1].metadata == {"prompt": "two dogs", "tag": "counting", "x": None}
    assert prompts[0].metadata["include"] == [{"class": "cat", "count": 1}]
    assert pickle.loads(pickle.dumps(prompts))[1].metadata == prompts[1].metadata   # all_gather_object keeps it
    (tmp_path / "t.txt").write_text("a cat\n\nb dog\n")
    assert [p.metadata for p in train.read_prompts(tmp_path / "t.txt")] == [None, None]

    cases = {"p.json": ('{"prompt": "a"}\n', r"p\.json: expected a \.txt .* or \.jsonl"),
             "k.jsonl": ('{"prompt": "a"}\n\n{"caption": "b"}\n', r"k\.jsonl:3: expected a JSON object with a \"prom"),
             "m.jsonl": ('{"prompt": "a"}\n{"prompt": "b",}\n', r"m\.jsonl:2: malformed JSON"),
             "u.txt": (b"fine\n\xff bad\n", r"u\.txt:2: not UTF-8")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ValueError, match=message):
            train.read_prompts(tmp_path / name)


# ----------------------------------------------------------------------------------------- metadata end to end

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(main, args, rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main([str(a) for a in args])


def run_world(main, args, world: int) -> None:
    """main(args) in `world` processes forked from this one (torch already imported), a gloo group on loopback."""
    port, context = free_port(), multiprocessing.get_context("fork")
    processes = [context.Process(target=_rank, args=(main, args, rank, world, port)) for rank in range(world)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [p.exitcode for p in processes] == [0] * world


@pytest.fixture(scope="module")
def geneval_prompts(tmp_path_factory) -> Path:
    """Six toy GenEval prompts with their metadata, plus fields of our own that must survive the trip."""
    lines = (ROOT / "toy" / "geneval_train.jsonl").read_text().splitlines()[:6]
    path = tmp_path_factory.mktemp("meta") / "geneval_metadata.jsonl"
    path.write_text("".join(json.dumps(json.loads(line) | {"id": i, "note": {"n": [i]}}) + "\n"
                    for i, line in enumerate(lines)))
    return path


def test_grpo_metadata_reaches_the_reward_per_sample_with_1_and_2_processes(geneval_prompts, tmp_path):
    prompts = {"geneval": train.read_prompts(geneval_prompts), "ocr": train.read_prompts(ROOT / "toy/ocr_train.txt")}
    def groups(seed):                                                         # iteration 1's 4 groups
        return train.sample_groups(prompts, {"geneval": 1.0, "ocr": 1.0}, 4, train.sample_seed(seed, 1))
    seed = next(s for s in range(50) if Counter(t for t, _ in groups(s)) == {"geneval": 2, "ocr": 2})
    images = [g for g in groups(seed) for _ in range(2)]                      # 8 images, groups of 2
    halves = [[p.metadata for t, p in images[h * 4: h * 4 + 4] if t == "geneval"] for h in (0, 1)]
    expected = Counter(json.dumps(h) for h in halves if h)                    # one request per micro-batch of 4
    assert sum(len(h) for h in halves) == 4 and all(m["id"] in range(6) for h in halves for m in h)

    for world in (1, 2):
        log = []
        with loopback(geneval_stub(log)) as url:
            run_world(train.main, ["--algo", "grpo", "--task_rewards", "geneval=geneval_server,ocr=toy_ocr",
                                   "--reward_options", f"geneval_server.url={url},geneval_server.retries=0",
                                   "--prompts", f"geneval={geneval_prompts},ocr={ROOT / 'toy/ocr_train.txt'}",
                                   "--images_per_iteration", 8, "--group_size", 2, "--micro_batch", 4, "--steps", 2,
                                   "--train_steps", 1, "--updates", 1, "--iterations", 1, "--eval_every", 0, "--seed", seed,
                                   "--out", tmp_path / f"world{world}"], world)
        assert Counter(json.dumps(r["meta_datas"]) for r in log) == expected, world   # each image its own dict
        assert all(r["only_strict"] is True for r in log)
        metrics = json.loads((tmp_path / f"world{world}" / "metrics.jsonl").read_text())
        assert metrics["reward/geneval"] == pytest.approx(np.mean([np.asarray(Image.open(io.BytesIO(b))).mean() / 255
                                                                   for r in log for b in r["images"]]), abs=1e-5)


def test_evaluate_metadata_reaches_the_reward_per_sample_with_1_and_2_processes(geneval_prompts, tmp_path):
    metadata = [p.metadata for p in train.read_prompts(geneval_prompts)][:5]
    for world in (1, 2):
        log, out = [], tmp_path / f"world{world}"
        with loopback(geneval_stub(log)) as url:
            run_world(evaluate.main, ["--prompts", f"geneval={geneval_prompts}", "--rewards", "geneval=geneval_server",
                                      "--reward_options", f"geneval_server.url={url}", "--max_prompts", 5,
                                      "--steps", 2, "--grid", 2, "--out", out], world)
        shards = [metadata[r::world] for r in range(world)]                  # rank r scores prompts r, r + N, ...
        assert sorted(json.dumps(r["meta_datas"]) for r in log) == sorted(json.dumps(s) for s in shards)
        assert all(r["only_strict"] is False for r in log)                   # evaluation
        record = json.loads((out / "results.json").read_text())
        accuracy = [float(m["id"] % 2) for m in metadata]                    # the stub's `rewards`
        assert record["table"]["base"]["geneval"] == pytest.approx(np.mean(accuracy))
        tags = {m["tag"] for m in metadata}
        by_tag = {t: np.mean([a for a, m in zip(accuracy, metadata) if m["tag"] == t]) for t in tags}
        breakdown = record["breakdown"]["base"]["geneval"]
        assert breakdown["by_tag"] == pytest.approx(by_tag)
        assert breakdown["tag_mean"] == pytest.approx(np.mean(list(by_tag.values())))
        assert set(breakdown["details"]) == {"score", "strict_accuracy"}


def teardown_module():
    RELEASE.set()
