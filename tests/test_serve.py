"""`attnkit serve`: the official `openai` client against a server started here, on a tiny chat model
trained in the fixture (and SmolLM2 once): greedy text equals `generate_text` and the CLI, streaming
and not; every error has its status and OpenAI's body; a client that leaves frees its slot."""

import contextlib
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F
import uvicorn
from click.testing import CliRunner

from attnkit.chat import end_of_turn_ids, render_chat
from attnkit.checkpoints import build_model, load_checkpoint, save_checkpoint
from attnkit.cli import main
from attnkit.config import preset
from attnkit.encoding import embed_texts
from attnkit.generate import Sampling, generate_text, stream_text
from attnkit.serve import bind, create_app
from attnkit.tokenizers import train_bpe, train_wordpiece

KEY = "sk-test"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EXCHANGES = [("hi", "hello there"), ("what is red?", "a colour"), ("name a fruit", "an apple"),
             ("count to three", "one two three")]


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """A 2-layer Llama-shaped chat model that has learnt four exchanges by heart (greedy replies are theirs)."""
    torch.manual_seed(0)
    text = "".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for q, a in EXCHANGES)
    tok = train_bpe(text * 4, vocab_size=300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = TEMPLATE
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, context_length=96, n_layer=2, n_head=4, n_kv_head=2,
                 d_model=64, d_ff=128)
    model = build_model(cfg)
    ids = torch.tensor(tok.encode(text * 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 65, (16,))
        batch = torch.stack([ids[s:s + 65] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "chat", model.eval(), tok)


@pytest.fixture(scope="module")
def reference(chat_ckpt):
    """A second copy of the served checkpoint, for the expected outputs."""
    return load_checkpoint(chat_ckpt)


@contextlib.contextmanager
def running(app):
    """The app served by uvicorn on a free localhost port, in a background thread -> its base URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def serving(ckpt, **options):
    model, tok = load_checkpoint(ckpt)
    return create_app(model, tok, model_name="tiny", **options)


@pytest.fixture(scope="module")
def url(chat_ckpt):
    with running(serving(chat_ckpt, api_key=KEY, max_tokens_cap=40, max_body_bytes=4096, max_concurrent=4)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


CHAT_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_models_lists_the_one_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "attnkit"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_greedy_completion_equals_generate_text_and_the_cli(client, reference, chat_ckpt):
    model, tok = reference
    out = client.completions.create(model="tiny", prompt=CHAT_PROMPT, max_tokens=12, temperature=0)
    expected = generate_text(model, tok, CHAT_PROMPT, max_new_tokens=12, sampling=Sampling(temperature=0))
    assert out.choices[0].text == expected and expected.startswith("hello there<|im_end|>")
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    assert out.choices[0].finish_reason == "length" and out.choices[0].index == 0
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(tok.encode(CHAT_PROMPT)), 12, len(tok.encode(CHAT_PROMPT)) + 12)
    cli = CliRunner().invoke(main, ["generate", "--ckpt", str(chat_ckpt), "-p", CHAT_PROMPT, "--temperature", "0",
                                    "--max-new-tokens", "12", "--device", "cpu"])
    assert cli.exit_code == 0 and cli.stdout == CHAT_PROMPT + expected + "\n"


def test_streamed_completion_is_the_same_text_then_finish_and_usage(client, reference):
    model, tok = reference
    chunks = list(client.completions.create(model="tiny", prompt=CHAT_PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == generate_text(model, tok, CHAT_PROMPT, max_new_tokens=12, sampling=Sampling(temperature=0))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 3  # piece by piece, not one blob
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].choices[0].text == ""
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)


def test_chat_reply_stops_at_the_end_of_turn_and_equals_generate_chat(client, reference, chat_ckpt):
    model, tok = reference
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert out.choices[0].message.content == "hello there" and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "stop" and out.object == "chat.completion"
    assert out.usage.prompt_tokens == len(tok.encode(CHAT_PROMPT))
    assert out.usage.completion_tokens == len(tok.encode("hello there<|im_end|>"))
    cli = CliRunner().invoke(main, ["generate", "--ckpt", str(chat_ckpt), "--chat", "-p", "hi", "--temperature", "0",
                                    "--device", "cpu"])
    assert cli.exit_code == 0 and cli.stdout == "hello there\n"
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "name a fruit"}],
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "an apple"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_strings_seeds_and_n_choices(client, reference):
    model, tok = reference
    out = client.completions.create(model="tiny", prompt=CHAT_PROMPT, max_tokens=12, temperature=0, stop=["there"])
    assert out.choices[0].text == "hello " and out.choices[0].finish_reason == "stop"
    asked = dict(model="tiny", prompt="what", max_tokens=8, temperature=1.0, seed=5, n=2)
    first, again = client.completions.create(**asked), client.completions.create(**asked)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    # choice i is seed + i, the same draw as generate_text with that seed
    assert texts == [generate_text(model, tok, "what", max_new_tokens=8, sampling=Sampling(1.0), seed=5 + i)
                     for i in range(2)]
    chunks = list(client.completions.create(**asked, stream=True))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(2)]
    assert streamed == texts


def _post(url, path, body, key=KEY, timeout=30):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = json.dumps(body) if isinstance(body, (dict, list)) else body  # else text, bytes or chunks
    return httpx.post(url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=timeout)


GOOD = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("body, status, param, says", [
    ('{"model": "tiny", "prompt": ', 400, None, "not valid JSON"),
    ([1, 2], 400, None, "must be a JSON object"),
    ({**GOOD, "max_tokens": "5"}, 400, "max_tokens", "'max_tokens' must be a valid integer"),
    ({**GOOD, "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    ({**GOOD, "seed": 2**70}, 400, "seed", "'seed' must be less than or equal to"),
    ({**GOOD, "stop": [1]}, 400, "stop", "a string or a list"),
    ({**GOOD, "logit_bias": {}}, 400, "logit_bias", "unknown field 'logit_bias'"),
    ({"model": "tiny"}, 400, "prompt", "'prompt' is required"),
    ({**GOOD, "prompt": [1, 2]}, 400, "prompt", "token ids are not accepted"),
    ({**GOOD, "max_tokens": 41}, 400, "max_tokens", "over this server's cap of 40"),
    ({**GOOD, "prompt": "hello " * 60, "max_tokens": 40}, 400, "prompt", "exceeds the model's context of 96"),
    ({**GOOD, "n": 5}, 400, "n", "at most 4 at once"),
    ({**GOOD, "model": "gpt-4"}, 404, "model", "is not served here"),
])
def test_bad_completion_requests_get_their_status_and_openai_error_body(url, body, status, param, says):
    response = _post(url, "/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert says in error["message"] and error["param"] == param


def test_chat_errors_embeddings_on_a_decoder_and_unknown_routes(url, client):
    bad = _post(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})
    assert bad.status_code == 400 and "role 'robot'" in bad.json()["error"]["message"]
    long = [{"role": "user", "content": "hello " * 80}]
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context") as e:
        client.chat.completions.create(model="tiny", messages=long)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="serves /v1/completions and /v1/chat/completions"):
        client.embeddings.create(model="tiny", input="hi")
    for method, path in (("GET", "/nothing"), ("GET", "/v1/nothing"), ("POST", "/v1/models")):
        response = httpx.request(method, url + path, headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code in (404, 405) and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_wrong_or_missing_key_is_401(url):
    for key in ("sk-wrong", None):
        response = _post(url, "/v1/completions", GOOD, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    for scheme in ("bearer", "BEARER"):  # the scheme's name is case-insensitive (was 401 "no API key was given")
        response = httpx.get(url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert response.status_code == 200 and response.json()["data"][0]["id"] == "tiny"
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401


def test_a_body_over_the_limit_is_413_declared_or_streamed(url):
    big = json.dumps({**GOOD, "prompt": "x" * 5000})
    response = _post(url, "/v1/completions", big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    chunked = _post(url, "/v1/completions", (big[i:i + 1000].encode() for i in range(0, len(big), 1000)))
    assert chunked.status_code == 413 and "limit of 4096 bytes" in chunked.json()["error"]["message"]
    assert _post(url, "/v1/completions", GOOD).status_code == 200  # and it goes on serving


# --- a slow model: a full queue, clients that leave, timeouts ----------------------------------------

@pytest.fixture()
def slow(chat_ckpt):
    """A served model whose every decoding step takes 50 ms; ``steps`` counts them."""
    model, tok = load_checkpoint(chat_ckpt)
    steps = []
    advance = model.advance

    def slow_advance(state, tokens):
        steps.append(1)
        time.sleep(0.05)
        return advance(state, tokens)

    model.advance = slow_advance
    return model, tok, steps


def _wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_full_queue_is_503_and_a_client_that_leaves_frees_its_slot(slow):
    model, tok, steps = slow
    app = create_app(model, tok, model_name="tiny", max_tokens_cap=60, max_concurrent=1)
    scheduler = app.state.scheduler
    with running(app) as url:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as streamed:
            lines = streamed.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).startswith('data: {"id"')
            busy = _post(url, "/v1/completions", GOOD, key=None)
            assert busy.status_code == 503
            assert busy.json()["error"]["code"] == "server_busy" and busy.json()["error"]["type"] == "server_error"
        # the client has gone: its generation stops at the next token and its slot is free
        assert _wait_until(lambda: scheduler.in_flight == 0) and scheduler.cancelled == 1
        stopped_at = len(steps)
        assert stopped_at < 30
        served = _post(url, "/v1/completions", GOOD, key=None)
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 2
        # a non-streaming client that gives up is noticed too
        with pytest.raises(httpx.ReadTimeout):
            _post(url, "/v1/completions", {**body, "stream": False}, key=None, timeout=0.5)
        assert _wait_until(lambda: scheduler.in_flight == 0) and scheduler.cancelled == 2
        assert len(steps) - stopped_at < 30


def test_a_stream_cut_short_by_shutdown_ends_with_an_error_event_not_done(slow):
    # the stream just stopped: no finish_reason, no error and no [DONE], so a client took it as whole
    from sse_starlette.sse import AppStatus

    model, tok, steps = slow
    app = create_app(model, tok, model_name="tiny", max_tokens_cap=60)
    with running(app) as url:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 60, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as streamed:
                events = (line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: "))
                assert json.loads(next(events))["choices"][0]["finish_reason"] is None
                AppStatus.should_exit = True  # what uvicorn's SIGINT / SIGTERM handler sets
                rest = list(events)
        finally:
            AppStatus.should_exit = False
    assert len(steps) < 50 and "[DONE]" not in rest
    assert json.loads(rest[-1])["error"]["code"] == "shutting_down"
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in rest[:-1])


def test_a_request_that_fails_in_the_batch_fails_alone(slow, reference, monkeypatch):
    # one request's sampling error lost the batch: every request decoding beside it got a 500 too
    import attnkit.generate as generate

    model, tok, steps = slow
    real = generate.sample_next
    monkeypatch.setattr(generate, "sample_next", lambda logits, sampling, *a, **k: (
        (_ for _ in ()).throw(RuntimeError("bad row")) if sampling.temperature == 0.25 and len(steps) > 3
        else real(logits, sampling, *a, **k)))
    expected = generate_text(reference[0], tok, "hi", max_new_tokens=20, sampling=Sampling(temperature=0))
    app = create_app(model, tok, model_name="tiny", max_tokens_cap=60)
    with running(app) as url, ThreadPoolExecutor(2) as pool:
        fine = pool.submit(_post, url, "/v1/completions", {**GOOD, "max_tokens": 20, "temperature": 0}, None)
        failing = pool.submit(_post, url, "/v1/completions", {**GOOD, "max_tokens": 20, "temperature": 0.25}, None)
        fine, failing = fine.result(), failing.result()
    assert failing.status_code == 500 and failing.json()["error"]["type"] == "server_error"
    assert fine.status_code == 200 and fine.json()["choices"][0]["text"] == expected


def test_concurrent_requests_share_decoding_steps_and_get_the_text_they_get_alone(slow, reference):
    model, tok, steps = slow
    prompts = [CHAT_PROMPT, "<|im_start|>user\nname a fruit<|im_end|>\n<|im_start|>assistant\n", "what", "count to"]
    budgets = [12, 20, 8, 16]
    expected = [generate_text(reference[0], tok, p, max_new_tokens=n, sampling=Sampling(temperature=0))
                for p, n in zip(prompts, budgets)]
    forwards, schedulers = {}, {}
    for batching in (True, False):
        app = create_app(model, tok, model_name="tiny", max_tokens_cap=40, batching=batching)
        before = len(steps)
        with running(app) as url:
            api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

            def complete(job):
                return api.completions.create(model="tiny", prompt=job[0], max_tokens=job[1], temperature=0)

            with ThreadPoolExecutor(len(prompts)) as pool:
                outs = list(pool.map(complete, zip(prompts, budgets)))
        assert [out.choices[0].text for out in outs] == expected
        forwards[batching], schedulers[batching] = len(steps) - before, app.state.scheduler
        assert schedulers[batching].batching == batching and schedulers[batching].in_flight == 0
    # every token after a request's first (its prefill's) takes one row of a forward: one at a time,
    # a forward each; batched, concurrent rows share forwards
    rows = sum(out.usage.completion_tokens - 1 for out in outs)
    assert forwards[False] == rows and schedulers[False].steps == 0
    assert schedulers[True].row_steps == rows and schedulers[True].steps == forwards[True]
    assert max(budgets) - 1 <= forwards[True] < 0.6 * rows


def test_a_request_past_the_timeout_is_504_or_an_error_event(slow):
    model, tok, _ = slow
    app = create_app(model, tok, model_name="tiny", max_tokens_cap=60, timeout=0.4)
    with running(app) as url:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 60}
        response = _post(url, "/v1/completions", body, key=None)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        events = _post(url, "/v1/completions", {**body, "stream": True}, key=None).text
        last = [line for line in events.splitlines() if line.startswith("data: ")][-1]
        assert json.loads(last[len("data: "):])["error"]["code"] == "timeout" and "[DONE]" not in events
        assert _wait_until(lambda: app.state.scheduler.in_flight == 0) and app.state.scheduler.cancelled == 2


# --- an encoder: embeddings ------------------------------------------------------------------------

def test_embeddings_of_an_encoder_equal_embed_texts(tmp_path):
    corpus = "a man plays a guitar\nthe cat sat on the mat\na woman reads a book\n" * 5
    tok = train_wordpiece(corpus, vocab_size=120)
    torch.manual_seed(0)
    encoder = build_model(preset("bert-tiny", vocab_size=tok.vocab_size, context_length=32)).eval()
    path = save_checkpoint(tmp_path / "enc", encoder, tok)
    model, tok = load_checkpoint(path)
    texts = ["a man plays a guitar", "the cat"]
    expected = embed_texts(model, tok, texts)
    with running(create_app(model, tok, model_name="enc")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        out = client.embeddings.create(model="enc", input=texts)  # the client asks for base64
        assert [d.index for d in out.data] == [0, 1]
        assert torch.equal(torch.tensor([d.embedding for d in out.data]), expected)
        assert out.usage.prompt_tokens == sum(len(tok.encode(t)) + 2 for t in texts)
        floats = httpx.post(url + "/v1/embeddings", json={"model": "enc", "input": "the cat", "encoding_format": "float"})
        torch.testing.assert_close(torch.tensor(floats.json()["data"][0]["embedding"]), expected[1])
        with pytest.raises(openai.BadRequestError, match="serves /v1/embeddings"):
            client.completions.create(model="enc", prompt="hi")
        too_long = httpx.post(url + "/v1/embeddings", json={"model": "enc", "input": "the cat " * 40})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


# --- the real chat model, and the command ----------------------------------------------------------

def test_smollm2_answers_over_the_api_as_in_the_terminal():
    model, tok = load_checkpoint("smollm2-135m")
    with running(create_app(model, tok, model_name="smollm2-135m")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        out = client.chat.completions.create(model="smollm2-135m", messages=question, temperature=0, max_tokens=30)
        assert out.choices[0].message.content == "The capital of France is Paris."
        assert out.choices[0].finish_reason == "stop"
        expected = "".join(stream_text(model, tok, render_chat(tok, question), max_new_tokens=30,
                                       sampling=Sampling(temperature=0), stop_ids=end_of_turn_ids(tok, model.cfg.end_ids)))
        assert out.choices[0].message.content == expected


def test_serve_command_help_and_clear_errors(chat_ckpt):
    runner = CliRunner()
    help_text = runner.invoke(main, ["serve", "--help"]).output
    assert "attnkit serve --ckpt smollm2-135m" in help_text and "curl" in help_text and "--api-key" in help_text
    missing = runner.invoke(main, ["serve", "--ckpt", str(chat_ckpt.parent / "nothing")])
    assert missing.exit_code == 2 and missing.output.startswith("error: ")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = runner.invoke(main, ["serve", "--ckpt", str(chat_ckpt), "--port", port])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    bad = runner.invoke(main, ["serve", "--ckpt", str(chat_ckpt), "--port", "0", "--max-concurrent", "0"])
    assert bad.exit_code == 2 and "--max-concurrent must be at least 1" in bad.output


def test_playground_page_and_attention_view(url, reference):
    from attnkit.plots import attention_weights

    page = httpx.get(url + "/")
    assert page.status_code == 200 and "attnkit playground" in page.text
    assert "/attnkit/attention" in page.text and "http" not in page.text.split("<script>")[1]  # no CDN
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(url + "/attnkit/attention", json={"text": "hi"}).status_code == 401
    reply = httpx.post(url + "/attnkit/attention", json={"text": CHAT_PROMPT, "layer": 1, "head": 3}, headers=headers)
    assert reply.status_code == 200
    view = reply.json()
    model, tok = reference
    ids, maps = attention_weights(model, tok, CHAT_PROMPT)
    assert view["tokens"] == [tok.decode([i]) for i in ids] and (view["n_layers"], view["n_heads"]) == (2, 4)
    weights = torch.tensor(view["weights"])
    assert torch.allclose(weights, maps[1][0, 3], atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(len(ids)), atol=1e-4) and weights.triu(1).abs().max() == 0
    chat = httpx.post(url + "/attnkit/attention", headers=headers,
                      json={"messages": [{"role": "user", "content": "hi"}], "layer": 0, "head": 0}).json()
    assert "".join(chat["tokens"]).startswith("<|im_start|>user\nhi<|im_end|>")
    bad = httpx.post(url + "/attnkit/attention", json={"text": "hi", "layer": 9}, headers=headers)
    assert bad.status_code == 400 and "layer and head" in bad.json()["error"]["message"]


# --- the playground in a real browser ------------------------------------------------------------------

def _chromium():
    """A headless Chromium driven by Selenium (Debian's chromium and chromium-driver; no download)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (scripts/system_packages.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_playground_in_a_browser_streams_the_text_and_shows_the_models_attention(slow, reference, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from attnkit.plots import attention_weights

    model, tok, _ = slow  # 50 ms a token: the text arrives piece by piece
    expected = generate_text(reference[0], tok, CHAT_PROMPT, max_new_tokens=16, sampling=Sampling(temperature=0))
    browser = _chromium()
    try:
        with running(create_app(model, tok, model_name="tiny", max_tokens_cap=40)) as url:
            browser.get(url + "/")
            assert _wait_until(lambda: browser.find_element(By.ID, "model").text == "tiny")
            for field, value in (("prompt", CHAT_PROMPT), ("max_tokens", "16"), ("temperature", "0")):
                box = browser.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)
            browser.find_element(By.ID, "go").click()
            seen = []  # the output box while the stream comes in
            while browser.find_element(By.ID, "go").get_attribute("disabled") or not seen:
                seen.append(browser.find_element(By.ID, "output").text)
                if len(seen) > 2000:
                    break
            output = browser.find_element(By.ID, "output")
            assert browser.execute_script("return arguments[0].textContent", output) == expected
            partial = {text for text in seen if text and text != expected.strip()}
            assert len(partial) >= 2, f"no streamed pieces seen: {seen[:5]}"
            # the attention view of the text so far: a span per token, then hover one
            ids, maps = attention_weights(reference[0], tok, CHAT_PROMPT + expected)
            assert _wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#tokens span")) == len(ids))
            spans = browser.find_elements(By.CSS_SELECTOR, "#tokens span")
            query = len(ids) - 3
            ActionChains(browser).move_to_element(spans[query]).perform()
            assert _wait_until(lambda: spans[query].get_attribute("class") == "query")
            shown = [float(s.get_attribute("title").split()[1]) for s in spans]  # "attention 0.1234"
            assert torch.allclose(torch.tensor(shown), maps[0][0, 0, query].float(), atol=1e-4)
            page = torch.tensor(browser.execute_script("return attention.weights[arguments[0]]", query))
            assert torch.allclose(page, maps[0][0, 0, query].float(), atol=6e-6)  # sent with 5 decimals
            assert page[query + 1:].abs().max() == 0 and abs(float(page.sum()) - 1) < 1e-4
            browser.save_screenshot(str(tmp_path / "playground.png"))  # the test's artifact
            assert (tmp_path / "playground.png").stat().st_size > 10_000
    finally:
        browser.quit()


def test_serve_says_where_it_listens(chat_ckpt, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # start, then stop at once
    result = CliRunner().invoke(main, ["serve", "--ckpt", str(chat_ckpt), "--port", "0", "--model-name", "tiny"])
    assert result.exit_code == 0, result.output
    assert re.search(r"attnkit: serving tiny on http://127\.0\.0\.1:[1-9][0-9]* \(Ctrl-C stops\)", result.output)


def test_chat_command_on_a_small_context_refuses_a_long_message_and_goes_on(chat_ckpt):
    # context 96: the old default reply room of 512 refused every message; one message too long for
    # the context ended the session (exit 2) and lost the history
    lines = "hi\n" + "word " * 200 + "\nname a fruit\n"
    result = CliRunner().invoke(main, ["chat", "--ckpt", str(chat_ckpt), "--temperature", "0"], input=lines)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["hello there", "an apple"]
    assert re.search(r"error: the message is \d+ tokens; with 48 for the reply it exceeds the model's context of 96",
                     result.stderr)
