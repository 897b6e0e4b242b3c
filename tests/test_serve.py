"""`python -m maxlm.serve`: the OpenAI-compatible server, through the official `openai` client (a real server
process) and in process (FastAPI's TestClient), against `maxlm.sample`, the jitted scorer and its own
non-streamed replies."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from maxlm import tokenizer as tokenizer_lib
from maxlm.data import chat
from maxlm.inference import server
from maxlm.inference.engine import Engine
from maxlm.interop import pretrained
from maxlm.model import scoring
from maxlm.training import pretrain as train
from tests.helpers import ROOT, small_config


@pytest.fixture(scope="module")
def run(shared_corpus, shared_tok_path, tmp_path_factory):
    """A 40-step tiny pretraining run (context 128) to serve."""
    work = str(tmp_path_factory.mktemp("serve") / "tiny")
    train.train(small_config(shared_corpus, **{"tokenizer.path": shared_tok_path, "train.num_steps": 40,
                                               "train.num_samples": 0, "model.max_seq_len": 128}), work)
    return work


@pytest.fixture(scope="module")
def inproc(run):
    """(TestClient with the lifespan running, config, params, tokenizer) over a 4-slot engine."""
    config, params, _ = pretrained.load_workdir(run)
    tok = tokenizer_lib.load(tokenizer_lib.run_tokenizer_path(config, run))
    engine = Engine(config, params, slots=4, chunk=32, block=4, eos_id=tok.eos_id, detokenize=tok.decode)
    app = server.build_app(server.Served(engine, tok, "tiny", chat.load_template("chatml")))
    with TestClient(app) as client:
        yield client, config, params, tok


def _events(response) -> list:
    """The JSON payloads of a server-sent-event stream, "[DONE]" kept as a string."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_echoed_prompt_logprobs_are_the_scorers_as_lm_eval_reads_them(inproc):
    """lm-evaluation-harness's `local-completions` log-likelihood request (token ids, echo, max_tokens 1,
    logprobs 1) parsed its way (sum of token_logprobs[ctxlen:-1]; greedy when each equals its top-1) gives
    `scoring.loglikelihoods`' (sum, is_greedy); the tokenizer routes it probes answer as vLLM's do."""
    client, config, params, tok = inproc
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.id_to_piece(tok.eos_id)
    ids = client.post("/tokenize", json={"prompt": "the cat sat", "add_special_tokens": False}).json()["tokens"]
    assert ids == tok.encode("the cat sat")
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == tok.decode(ids)
    prefix = tokenizer_lib.text_prefix(tok)
    pairs = [(prefix + tok.encode("the cat"), tok.encode(" sat on the mat")),
             (prefix + tok.encode("once upon"), tok.encode(" a time"))]
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": [c + x for c, x in pairs], "temperature": 0,
                                             "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    want = scoring.loglikelihoods(config, params, [c for c, _ in pairs], [x for _, x in pairs], with_greedy=True)
    for choice, (ctx, cont), (logprob, greedy) in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), pairs,
                                                      want):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ctx) + len(cont) + 1 and lp["token_logprobs"][0] is None
        got = lp["token_logprobs"][len(ctx):-1]
        assert sum(got) == pytest.approx(logprob, abs=1e-4)
        assert all(t == pytest.approx(max(top.values()), abs=1e-6) for t, top in
                   zip(got, lp["top_logprobs"][len(ctx):-1])) == greedy


def test_streams_equal_whole_replies_and_never_send_text_past_a_stop_string(inproc):
    client, *_ = inproc
    base = {"prompt": "the", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    assert len(whole) > 8, repr(whole)
    stop = next(whole[i:i + 2] for i in range(4, len(whole) - 2) if whole[i:i + 2].strip())
    cut = whole[:whole.index(stop)]
    stopped = client.post("/v1/completions", json={**base, "stop": stop}).json()["choices"][0]
    assert (stopped["text"], stopped["finish_reason"]) == (cut, "stop")
    with client.stream("POST", "/v1/completions", json={**base, "stop": [stop], "stream": True,
                                                         "stream_options": {"include_usage": True}}) as s:
        events = _events(s)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] > 0
    chunks = [e["choices"][0] for e in events[:-2]]
    assert "".join(c["text"] for c in chunks) == cut and chunks[-1]["finish_reason"] == "stop"
    assert all(c["finish_reason"] is None for c in chunks[:-1])

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    reply = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 20, "temperature": 0})
    message = reply.json()["choices"][0]["message"]
    with client.stream("POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 20,
                                                              "temperature": 0, "stream": True}) as s:
        events = _events(s)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == message["content"]


def test_seeded_samples_repeat_and_n_gives_n_choices_with_usage(inproc):
    client, *_ = inproc
    body = {"prompt": ["the", "a dog"], "max_tokens": 8, "temperature": 1.0, "top_k": 20, "seed": 7, "n": 3,
            "logprobs": 2}
    first, again = (client.post("/v1/completions", json=body).json() for _ in range(2))
    default = client.post("/v1/completions", json={"prompt": "the", "max_tokens": None, "ignore_eos": True}).json()
    assert default["usage"]["completion_tokens"] == 16  # the API's default
    assert [c["index"] for c in first["choices"]] == list(range(6))
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    tokens = sum(len(c["logprobs"]["tokens"]) for c in first["choices"])
    assert first["usage"]["completion_tokens"] == tokens
    assert all(len(top) <= 2 for c in first["choices"] for top in c["logprobs"]["top_logprobs"])


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "max_tokens": 1000}, 400, None),  # past the 128-token context
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": [], "max_tokens": 2}, 400, "prompt"),
    ({"prompt": [[1, 2, 100000]]}, 400, None),  # an id outside the vocabulary
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_completion_requests_get_openai_errors_and_the_server_keeps_serving(inproc, body, status, param):
    client, *_ = inproc
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"}) \
        if isinstance(body, bytes) else client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param and error["type"]
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_bad_chat_requests_and_unknown_routes(inproc):
    client, *_ = inproc
    for body, param in [({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
                        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": "hi"}, "messages")]:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_openai_client_against_python_m_maxlm_serve(run):
    """A real server process: models, greedy completion text equal to `maxlm.sample --print_completion_only`,
    chat (whole and streamed), 16 concurrent requests all answered as they are one by one, four malformed
    requests refused with 4xx while it keeps serving, and SIGTERM letting an open stream finish."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "maxlm.serve", f"--workdir={run}", f"--port={port}", "--slots=8",
                             "--chunk=64", "--log_level=warning"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        assert name == os.path.basename(run)

        done = client.completions.create(model=name, prompt="the cat", max_tokens=12, temperature=0)
        sampled = subprocess.run([sys.executable, "-m", "maxlm.sample", f"--workdir={run}", "--prompt=the cat",
                                  "--greedy", "--repetition_penalty=1", "--max_new_tokens=12",
                                  "--print_completion_only"], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=300)
        assert sampled.returncode == 0, sampled.stderr[-2000:]
        assert sampled.stdout == done.choices[0].text + "\n"
        assert done.usage.completion_tokens <= 12 and done.usage.prompt_tokens > 0

        messages = [{"role": "user", "content": "say something"}]
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0)
        streamed = client.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            reply.choices[0].message.content
        assert reply.choices[0].finish_reason in ("stop", "length")

        prompts = [f"{w} {i}" for i, w in enumerate(["the", "a", "one", "it"] * 4)]

        def ask(i: int) -> str:
            r = client.completions.create(model=name, prompt=prompts[i], max_tokens=4 + i, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 4 + i
            return r.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, range(16)))
        assert together == [ask(i) for i in range(16)]

        refusals = []
        for call in (lambda: client.completions.create(model=name, prompt="x", temperature=-1),
                     lambda: client.completions.create(model=name, prompt="x", max_tokens=5000),
                     lambda: client.completions.create(model="gpt-4", prompt="x"),
                     lambda: client.chat.completions.create(model=name, messages=[{"role": "wizard", "content": "x"}])):
            with pytest.raises(openai.APIStatusError) as caught:
                call()
            refusals.append(caught.value.status_code)
        assert refusals == [400, 400, 404, 400]
        assert httpx.post(f"{url}/v1/completions", content=b"{oops", timeout=10).status_code == 400
        assert client.completions.create(model=name, prompt="x", max_tokens=2).choices[0].text is not None

        # SIGTERM mid-stream: the open stream finishes, then the process exits cleanly.
        chunks: list = []

        def stream() -> None:
            for c in client.completions.create(model=name, prompt="the", max_tokens=100, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True},
                                               stream_options={"include_usage": True}):
                chunks.append(c)

        reader = threading.Thread(target=stream)
        reader.start()
        while not chunks and reader.is_alive():
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        assert proc.wait(120) == 0
        assert chunks[-1].usage.completion_tokens == 100
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
