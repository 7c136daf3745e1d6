"""Continuous batching (attnkit.generate.ContinuousBatch): requests that join a running batch at
different steps, with prompts of different lengths, get the tokens they get alone."""

import pytest
import torch

from attnkit.checkpoints import build_model
from attnkit.config import preset
from attnkit.errors import AttnkitError
from attnkit.generate import ContinuousBatch, Request, Sampling, generate_tokens


def _model(name, **overrides):
    torch.manual_seed(0)
    cfg = preset(name, vocab_size=80, n_layer=2, d_model=64, n_head=4, context_length=48, **overrides)
    return build_model(cfg).eval()


MODELS = {"llama": lambda: _model("llama-tiny", n_kv_head=2, d_ff=128),
          "gpt2": lambda: _model("gpt2-char-tiny")}  # learned positions: each row's own


def alone(model, prompt, n, sampling=None, seed=None, stop_ids=()):
    out = []
    for token, finished in generate_tokens(model, [prompt], max_new_tokens=n, sampling=sampling or Sampling(0),
                                           seed=seed, stop_ids=stop_ids):
        if bool(finished[0]):
            break
        out.append(int(token[0]))
    return out


def run(batch, arrivals):
    """arrivals: {step: [requests]}; steps until every request is done."""
    step = 0
    while step in arrivals or not batch.idle or any(s > step for s in arrivals):
        for request in arrivals.get(step, []):
            batch.submit(request)
        batch.step()
        step += 1
        assert step < 500


@pytest.mark.parametrize("name", MODELS)
def test_requests_joining_at_different_steps_get_their_own_tokens(name):
    model = MODELS[name]()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 80, (n,), generator=g).tolist() for n in (3, 11, 5, 14, 2)]
    budgets = [6, 10, 4, 40, 9]  # 14 + 40 > 48: that request re-encodes its latest half context on the way
    requests = [Request(p, n, Sampling(0)) for p, n in zip(prompts, budgets)]
    batch = ContinuousBatch(model, max_rows=3)
    run(batch, {0: requests[:2], 2: [requests[2]], 5: requests[3:]})
    for request, prompt, n in zip(requests, prompts, budgets):
        assert request.finish_reason == "length"
        assert request.tokens == alone(model, prompt, n)
    assert batch.state is None and batch.running == []


@pytest.mark.parametrize("name", MODELS)
def test_a_row_past_the_context_restarts_alone_while_the_others_keep_their_history(name):
    model = MODELS[name]()
    g = torch.Generator().manual_seed(2)
    long_prompt, short_prompt = torch.randint(0, 80, (20,), generator=g).tolist(), [7, 3]
    # 20 + 40 > 48: the first restarts on its latest half context at its 29th token, while the
    # second (room for 45 tokens) keeps the batch's cache from filling
    requests = [Request(long_prompt, 40, Sampling(0)), Request(short_prompt, 45, Sampling(0))]
    batch = ContinuousBatch(model)
    run(batch, {0: requests})
    assert requests[0].tokens == alone(model, long_prompt, 40)
    assert requests[1].tokens == alone(model, short_prompt, 45)


def test_the_batch_does_not_grow_while_requests_come_and_go():
    model = MODELS["llama"]()
    batch = ContinuousBatch(model, max_rows=4)
    requests = [Request([1 + i % 7, 2], 6, Sampling(0)) for i in range(40)]
    arrivals = {2 * i: [r] for i, r in enumerate(requests)}  # always some running: the batch never empties
    lengths = []
    step = 0
    while step in arrivals or not batch.idle or any(s > step for s in arrivals):
        for request in arrivals.get(step, []):
            batch.submit(request)
        batch.step()
        lengths.append(batch.state.length if batch.state is not None else 0)
        step += 1
    # padding every row has left is dropped at the next join: the longest history (a prompt and its
    # fed tokens, 7) plus the steps until the next join; kept, it would grow with every step (~85)
    assert len(lengths) > 80 and max(lengths) <= 10
    assert all(r.tokens == alone(model, list(r.prompt), 6) for r in requests)


def test_requests_that_arrive_together_are_prefilled_together_within_the_budget():
    model = MODELS["gpt2"]()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 80, (n,), generator=g).tolist() for n in (3, 9, 4, 6, 2, 5)]
    requests = [Request(p, 8, Sampling(0)) for p in prompts]
    batch = ContinuousBatch(model, max_rows=5, prefill_tokens=20)
    starts = []
    start = model.start
    model.start = lambda prompts, **kw: starts.append(len(prompts)) or start(prompts, **kw)
    run(batch, {0: requests})
    # 20 tokens of padded prompt a step, the first five sorted by length: [2, 3, 4] (3 x 4; a 6 would
    # make it 4 x 6), then [6, 9] (2 x 9; two rows were free), then the sixth once a row is free
    assert starts == [3, 2, 1]
    assert all(r.tokens == alone(model, p, 8) for r, p in zip(requests, prompts))


def test_sampling_stop_ids_and_cancel():
    model = MODELS["llama"]()
    sampled = Request([5, 6, 7], 12, Sampling(temperature=1.0, top_p=0.9), seed=3)
    reference = alone(model, [9, 9], 8)
    stopped = Request([9, 9], 8, Sampling(0), stop_ids=(reference[2],))
    cancelled = Request([1, 2, 3, 4], 20, Sampling(0))
    batch = ContinuousBatch(model)
    for r in (sampled, stopped, cancelled):
        batch.submit(r)
    for _ in range(3):
        batch.step()
    rows = len(batch.running)
    batch.cancel(cancelled)
    batch.step()
    assert cancelled.finish_reason == "cancelled" and len(batch.running) < rows and len(cancelled.tokens) == 3
    run(batch, {})
    assert sampled.tokens == alone(model, [5, 6, 7], 12, Sampling(temperature=1.0, top_p=0.9), seed=3)
    assert stopped.finish_reason == "stop" and stopped.tokens == reference[:reference.index(reference[2])]


def test_only_decoder_states_join():
    model = build_model(preset("gru-small", vocab_size=50, d_model=32)).eval()
    batch = ContinuousBatch(model)
    batch.submit(Request([1, 2], 3))
    batch.step()
    batch.submit(Request([3], 3))  # prefilled together they would be one state; joining a running one fails
    with pytest.raises(AttnkitError, match="cannot take new rows"):
        batch.step()


def test_a_request_whose_sampling_fails_ends_alone_and_the_others_get_their_tokens(monkeypatch):
    # any failure in one request's sampling lost the whole batch (serve answered 500 to every request in it)
    import attnkit.generate as generate

    model = MODELS["llama"]()
    broken = Sampling(temperature=0.5)
    real = generate.sample_next
    monkeypatch.setattr(generate, "sample_next", lambda logits, sampling, *a, **k: (
        (_ for _ in ()).throw(RuntimeError("bad row")) if sampling is broken else real(logits, sampling, *a, **k)))
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    requests = [Request(prompts[0], 8, Sampling(0)), Request(prompts[1], 8, broken), Request(prompts[2], 6, Sampling(0))]
    batch = ContinuousBatch(model, max_rows=3)
    run(batch, {0: requests[:2], 3: [requests[2]]})
    assert requests[1].finish_reason == "error" and str(requests[1].error) == "bad row" and requests[1].tokens == []
    for request, prompt, n in ((requests[0], prompts[0], 8), (requests[2], prompts[2], 6)):
        assert request.finish_reason == "length" and request.tokens == alone(model, prompt, n)
    assert batch.state is None and batch.running == []
