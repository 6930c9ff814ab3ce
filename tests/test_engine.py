"""engine.py's continuous batching in this process, on a tiny random checkpoint: what a request gets is what it gets
alone, through rows that come and go, cache rolls both ways and a sliding window; static batching, cancelling and a
failing request."""
import random

import pytest
import torch

from engine import Engine, Request, load
from test_sample import checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, proc, decode_one = load(checkpoint(tmp_path_factory.mktemp("engine") / "random", ctx=512), "cpu")
    return model, proc, decode_one


def prompt(proc, text):
    msgs = [{"role": "user", "content": text}]
    return proc(proc.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False))["input_ids"][0]


def alone(model, proc, ids, n):
    """model.generate's greedy text for one prompt, up to and with its first stop token, as the engine counts it."""
    new = model.generate(ids[None], n, temperature=0, stop_ids=proc.stop_ids)[0, len(ids):].tolist()
    return proc.decode(new[:next((i + 1 for i, t in enumerate(new) if t in proc.stop_ids), len(new))])


@pytest.mark.parametrize("window", [None, 8], ids=["full", "sliding-window"])
def test_rows_that_come_and_go_get_their_solo_greedy_text(tiny, window):
    """Prompts of 30 to 180 tokens through 4 rows of 256 columns, submitted as the engine steps, short ones among
    them: b outlives a past the last column, so the cache rolls left; c's prompt is longer than the columns left of
    the shared one, so it rolls right. Each answer is still the one generate gives it alone."""
    model, proc, decode_one = tiny
    model.config.text.sliding_window = window
    rng = random.Random(0)
    a, b, c = (prompt(proc, "x" * k + "?") for k in (1, 4, 150))  # 30, 33 and 179 tokens
    jobs = [(a, 200, 0), (b, 200, 100), (c, 70, 130)] + [(prompt(proc, f"{i}?"), rng.randint(1, 30), rng.randint(
        0, 300)) for i in range(8)]  # (prompt, max_tokens, the step it comes at)
    want = [alone(model, proc, ids, n) for ids, n, _ in jobs]
    engine = Engine(model, proc, decode_one, 4, 256)
    rolls, roll = [], engine.roll
    engine.roll = lambda d: (rolls.append(d), roll(d))
    got = {}
    try:
        for step in range(1000):
            for k, (ids, n, at) in enumerate(jobs):
                if at == step:
                    got[k] = engine.submit(Request(ids, n))
            if step > 300 and not engine.busy():
                break
            engine.step()
    finally:
        model.config.text.sliding_window = None
    assert engine.S == 256 and min(rolls) < 0 < max(rolls), rolls
    assert [got[k].text for k in range(len(jobs))] == want and all(r.finish in ("stop", "length") for r in got.values())
    assert engine.generated == sum(len(r.tokens) for r in got.values())


def test_a_seed_decides_a_sample_in_any_batch(tiny):
    model, proc, decode_one = tiny
    ids = prompt(proc, "Tell me.")
    engine = Engine(model, proc, decode_one, 4, 256)

    def sampled(seed, company):
        rows = [engine.submit(Request(ids, 16, temperature=1.2, top_p=0.9, top_k=50, seed=seed))]
        rows += [engine.submit(Request(prompt(proc, f"Other {k}."), 8 + k, temperature=k / 2)) for k in range(company)]
        while engine.busy():
            engine.step()
        return rows[0].text
    assert sampled(7, 0) == sampled(7, 3) != sampled(8, 3)


def test_static_batching_admits_into_an_empty_batch_only(tiny):
    model, proc, decode_one = tiny
    engine = Engine(model, proc, decode_one, 4, 256, static=True)
    a, b = engine.submit(Request(prompt(proc, "a"), 3)), engine.submit(Request(prompt(proc, "b"), 9))
    engine.step()
    c = engine.submit(Request(prompt(proc, "c"), 3))
    running = []
    while engine.busy():
        engine.step()
        running.append(engine.running())
    assert len(a.tokens) == 3 and len(b.tokens) == 9 and len(c.tokens) == 3
    assert running[:running.index(0) + 1] == [1] * 6 + [0]  # c waited for b, though a's row was free
    continuous = Engine(model, proc, decode_one, 4, 256)
    continuous.submit(Request(prompt(proc, "b"), 9))
    continuous.step()
    continuous.submit(Request(prompt(proc, "c"), 3))
    continuous.step()
    assert continuous.running() == 2


def test_a_step_decodes_the_rows_up_to_the_last_live_one(tiny):
    """Eager, a step runs over the slots up to the last live one, so one request in a big pool costs a 1-row step;
    every_row (a compiled step's one shape) runs over all of them."""
    model, proc, _ = tiny
    for every_row, want in ((False, [1, 3, 3, 1]), (True, [4] * 4)):
        rows = []
        engine = Engine(model, proc, lambda tok, *a: rows.append(len(tok)) or model.decode_one(tok, *a), 4, 256,
                        every_row=every_row)
        a = engine.submit(Request(prompt(proc, "a"), 30))
        engine.step()  # a in slot 0
        b, c = engine.submit(Request(prompt(proc, "b"), 2)), engine.submit(Request(prompt(proc, "c"), 30))
        engine.step()  # b and c in slots 1 and 2; b ends
        engine.step()
        c.cancelled = True
        engine.step()
        assert rows == want and (a.finish, b.finish, c.finish) == (None, "length", "cancelled")
        assert len(a.tokens) == 5 and proc.decode(a.tokens) == alone(model, proc, a.ids, 5)


def test_cancelled_and_failing_requests_end_alone(tiny):
    model, proc, decode_one = tiny
    engine = Engine(model, proc, decode_one, 4, 256)
    ok, gone = engine.submit(Request(prompt(proc, "Tell me."), 20)), engine.submit(Request(prompt(proc, "x"), 200))
    queued = engine.submit(Request(prompt(proc, "y"), 5))
    queued.cancelled = True
    broken = engine.submit(Request(prompt(proc, "z"), 5, pixels=torch.zeros(16, 1536), grid=torch.tensor([[1, 4, 4]])))
    engine.step()
    gone.cancelled = True
    while engine.busy():
        engine.step()
    assert (ok.finish, gone.finish, queued.finish, broken.finish) == ("length", "cancelled", "cancelled", "error")
    assert len(gone.tokens) == 2 and queued.tokens == [] and "ValueError" in broken.error
    assert ok.text == alone(model, proc, ok.ids, 20)
    events = []
    while not gone.events.empty():
        events.append(gone.events.get())
    assert events[-1] == ("done", "cancelled") and all(e[0] == "text" for e in events[:-1])
