"""Issue 31: what OpenAI clients expect: structured output, logprobs, n, and OpenAI Batch API files."""
import json
import re
from pathlib import Path

import numpy as np
import openai
import pytest
from test_server import Server, image_message, png_url  # noqa: F401 (png_url: a fixture)

from cogvlm2_lite.runtime.engine import Request
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.sampling import SamplingParams

HI = [{"role": "user", "content": "tell me something"}]
RECEIPT = {"type": "object", "additionalProperties": False, "required": ["tags", "total"],
           "properties": {"tags": {"type": "array", "items": {"enum": ["food", "drink", "tax"]}, "minItems": 1,
                                   "maxItems": 3},
                          "total": {"type": "integer", "minimum": 0, "maximum": 99}}}


def satisfies(value, schema) -> bool:
    """A small JSON-schema check of the keywords these tests use, independent of the library that constrains."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and all(k in value for k in schema.get("required", []))
                and (schema.get("additionalProperties", True) is not False or set(value) <= set(props))
                and all(satisfies(v, props[k]) for k, v in value.items() if k in props))
    if kind == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30)
                and all(satisfies(v, schema.get("items", {})) for v in value))
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", -1 << 63) <= value <= schema.get("maximum", 1 << 63))
    if kind == "string":
        return isinstance(value, str) and ("pattern" not in schema or re.search(schema["pattern"], value) is not None)
    if kind == "boolean":
        return isinstance(value, bool)
    return kind is None


@pytest.fixture(scope="module")
def server(tiny_bundle_b4):
    s = Server(tiny_bundle_b4)
    s.model = Path(tiny_bundle_b4).name
    yield s
    assert s.stop() == 0


# --- structured output ----------------------------------------------------------------------------------
def test_json_schema_answers_satisfy_it_at_any_temperature(server, png_url):
    c = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "receipt", "schema": RECEIPT, "strict": True}}
    for temperature, seed in [(0, None), (1, 1), (1, 2), (1, 3)]:
        r = c.chat.completions.create(model=server.model, messages=[image_message("what is on it", png_url)],
                                      max_tokens=80, temperature=temperature, seed=seed, response_format=fmt)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop" and satisfies(json.loads(text), RECEIPT), (temperature, text)
    r = c.chat.completions.create(model=server.model, messages=HI, max_tokens=40, temperature=1, seed=4,
                                  response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict), text
    assert text.startswith("{")


SCHEMAS = [
    {"type": "object", "required": ["a"], "additionalProperties": False,
     "properties": {"a": {"type": "object", "required": ["b"], "additionalProperties": False,
                          "properties": {"b": {"type": "boolean"}}}}},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "required": ["code"], "additionalProperties": False,
     "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}},
    {"type": "object", "required": ["word"], "additionalProperties": False,
     "properties": {"word": {"enum": ["héllo", "日本", "✓ ok"]}}},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["nested", "array-minItems", "pattern", "unicode"])
def test_schema_edge_cases_through_the_python_api(engine4, schema):
    requests = [Request("tell me something", params=SamplingParams(max_new_tokens=60, temperature=t, seed=s,
                                                                   json_schema=schema))
                for t, s in [(0, None), (1, 5), (1.5, 6), (1, 7)]]   # four rows decode side by side
    requests.append(Request("tell me something", params=SamplingParams(max_new_tokens=8)))  # a free row among them
    for r in engine4.generate(requests)[:4]:
        assert r.finish_reason == "length" or (r.finish_reason == "stop" and satisfies(json.loads(r.text), schema)), r
        assert r.finish_reason == "stop" or "pattern" in json.dumps(schema), r.text   # bounded schemas must finish


def test_a_bad_schema_is_one_sentence_naming_the_part(server):
    for fmt, words in [({"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}, "strin"),
                       ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
                       ({"type": "yaml"}, "response_format.type")]:
        r = server.post({"messages": HI, "response_format": fmt})
        err = r.json()["error"]
        assert r.status_code == 400 and words in err["message"] and err["param"] == "response_format", err
    with pytest.raises(UserError, match="json_schema"):
        SamplingParams(json_schema="{}")


# --- logprobs -----------------------------------------------------------------------------------------------
def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_greedy_logprobs_are_the_models_log_softmax_one_per_token(server, engine4):
    c = server.client()
    r = c.chat.completions.create(model=server.model, messages=HI, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob and e.top_logprobs[0].token == e.token
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    text_tokens = [e.token for e in content if not re.fullmatch(r"<\|[a-z_0-9]+\|>", e.token)]  # special tokens: no text
    assert "".join(text_tokens) == r.choices[0].message.content
    # the first token's logprob is the numpy log-softmax of the bundle's prefill logits
    from conftest import prompt
    engine4.clear_prefix_cache()
    ids, pos = prompt(engine4, "tell me something", image=False)
    logits = engine4.prefill([ids], None, [pos])[0]
    want = log_softmax(logits)
    assert content[0].logprob == pytest.approx(want.max(), abs=1e-5)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(np.sort(want)[::-1][:3], abs=1e-5)
    # streamed: the same entries, spread over the chunks
    streamed = [e for ch in c.chat.completions.create(model=server.model, messages=HI, max_tokens=6, temperature=0,
                                                      logprobs=True, top_logprobs=3, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = c.chat.completions.create(model=server.model, messages=HI, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    assert server.post({"messages": HI, "top_logprobs": 2}).status_code == 400        # needs logprobs: true
    assert server.post({"messages": HI, "logprobs": True, "top_logprobs": 21}).status_code == 400


# --- n ------------------------------------------------------------------------------------------------------
def test_n_choices_share_one_prefill_and_are_seeded_seed_plus_index(server, engine4):
    c = server.client()
    kw = dict(model=server.model, messages=HI, max_tokens=10, temperature=1.2)
    r = c.chat.completions.create(n=3, seed=11, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    singles = [c.chat.completions.create(n=1, seed=11 + i, **kw) for i in range(3)]
    assert [ch.message.content for ch in r.choices] == [s.choices[0].message.content for s in singles]
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens
    # more choices than rows queue for them; streamed choices carry their index
    texts = {}
    for ch in c.chat.completions.create(n=6, seed=11, stream=True, **kw):
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert [texts[i] for i in range(3)] == [s.choices[0].message.content for s in singles]


def test_forked_choices_match_separate_requests_token_for_token(engine4, photo):
    """The scheduler's fork: the children's rows start from a copy of the parent's prompt K/V, and one prefill
    runs for all of them."""
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s) for s in (1, 2, 3)]
    separate, calls_one = [], None
    for p in params:
        engine4.clear_prefix_cache()
        before = dict(engine4.timings.calls)
        separate.append(engine4.generate([Request("what is it", image=photo, params=p)])[0])
        calls_one = {k: v - before.get(k, 0) for k, v in engine4.timings.calls.items()}
    engine4.clear_prefix_cache()
    before = dict(engine4.timings.calls)
    parent = engine4.add(Request("what is it", image=photo, params=params[0]))
    children = [engine4.add(Request("what is it", image=photo, params=p), parent=parent) for p in params[1:]]
    while engine4.busy:
        engine4.step()
    assert [s.result().token_ids for s in [parent, *children]] == [r.token_ids for r in separate]
    calls = {k: v - before.get(k, 0) for k, v in engine4.timings.calls.items()}
    assert calls["vision"] == 1 and calls["prefill"] == calls_one["prefill"]   # one request's prefill, three answers
    assert [s.result().reused_tokens for s in children] == [separate[0].prompt_tokens] * 2


# --- OpenAI Batch API files -------------------------------------------------------------------------------
def test_batch_answers_an_openai_batch_file_as_the_server_does(server, engine4, tmp_path, png_url):
    from cogvlm2_lite.runtime.batch import run_batch
    bodies = {"img": {"model": "gpt-4o", "messages": [image_message("what is it", png_url)], "max_tokens": 8,
                      "temperature": 0},
              "text": {"messages": HI, "max_tokens": 6, "temperature": 0, "stop": None},
              "json": {"messages": HI, "max_tokens": 60, "temperature": 0, "response_format":
                       {"type": "json_schema", "json_schema": {"schema": RECEIPT}}},
              "lp": {"messages": HI, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2}}
    lines = [{"custom_id": k, "method": "POST", "url": "/v1/chat/completions", "body": b} for k, b in bodies.items()]
    lines += [{"custom_id": "url", "method": "POST", "url": "/v1/embeddings", "body": {}},
              {"custom_id": "get", "method": "GET", "url": "/v1/chat/completions", "body": {}},
              {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
              {"method": "POST"}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    summary = run_batch(engine4, inp, out)
    assert (summary.ok, summary.errors) == (4, 4)
    got = {o["custom_id"]: o for o in map(json.loads, out.read_text().splitlines()) if o["custom_id"] is not None}
    for key, body in bodies.items():
        served = server.post({**body, "model": None}).json()
        answer = got[key]["response"]["body"]
        assert got[key]["response"]["status_code"] == 200 and got[key]["error"] is None
        assert answer["object"] == "chat.completion" and set(answer) == set(served)
        assert answer["choices"][0]["message"] == served["choices"][0]["message"], key
        mine, theirs = answer["choices"][0]["logprobs"], served["choices"][0]["logprobs"]
        assert (mine is None) == (theirs is None), key
        for a, b in zip(*(x["content"] if x else [] for x in (mine, theirs)), strict=True):  # another process: ~1e-7
            assert a["token"] == b["token"] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-5), key
        details = "prompt_tokens_details"   # what the server's prefix cache reused differs, not the counts
        assert {**answer["usage"], details: None} == {**served["usage"], details: None}, key
    assert "/v1/embeddings" in got["url"]["response"]["body"]["error"]["message"]
    assert '"GET"' in got["get"]["response"]["body"]["error"]["message"]
    assert got["bad"]["response"]["status_code"] == 400 and "messages" in got["bad"]["response"]["body"]["error"]["message"]
    assert any(o.get("line") == 8 and "custom_id" in o["error"]["message"] for o in map(json.loads, out.read_text().splitlines()))
    again = run_batch(engine4, inp, out)                      # exactly once: a rerun finds every line done
    assert (again.ok, again.errors, again.skipped) == (0, 0, 8)
    retried = run_batch(engine4, inp, out, retry_errors=True)  # error lines (4xx answers) run again
    assert (retried.ok, retried.errors, retried.retried) == (0, 4, 4)
    assert len(out.read_text().splitlines()) == 8
