"""fate-serve for agents and front ends: tool calls and structured output (the real `openai`
client against a real server on the bundled model, whose chat template renders tools), logprobs
and echo checked against the engine's own logits, content parts, refused fields, the model routes,
the API key and CORS over plain HTTP, and the chat page in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fate.compiler import CompileOptions, compile_checkpoint
from fate.runtime.generate import SamplingConfig, Sampler, log_softmax
from fate.runtime.openai_api import ApiError, chat_tools
from fate.runtime.tools import FORMATS, ToolStream, split_calls

from browser import browser
from test_serve import BIN, PROMPT, Served, openai
from tiny_models import CHAT_TEMPLATE

KEY = "sk-fate-test"
ORIGIN = "http://page.example"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "pet": {"type": "boolean"}}, "required": ["name", "age", "pet"]}
ASKS = ["What is the weather in Paris?", "Describe a person.", "Hello", "Tell me about a cat called Tom."]


@pytest.fixture(scope="module")
def agent(example):
    """The bundled model behind a key and one allowed browser origin."""
    served = Served(example, "--api-key", KEY, "--cors-origin", ORIGIN)
    served.client = openai.OpenAI(base_url=served.base, api_key=KEY, max_retries=0, timeout=120)
    yield served
    served.close()


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """The bundled model compiled without its chat template."""
    root = tmp_path_factory.mktemp("plain")
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "tiny-moe", root / "ckpt",
                    ignore=shutil.ignore_patterns("chat_template.jinja"))
    compile_checkpoint(CompileOptions(root / "ckpt", root / "plain", bits=(4,)), log=lambda _m: None)
    return root / "plain"


def post(served: Served, route: str, body: dict, key: str | None = KEY, **headers) -> httpx.Response:
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{served.base}{route}", json=body, headers=headers, timeout=120)


def assert_weather_call(call, name: str = "get_weather") -> None:
    assert call.type == "function" and call.function.name == name and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    if name == "get_weather":
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("C", "F")
        assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 24
    else:
        assert set(arguments) == {"zone"}


# ---------------------------------------------------------------------- tools

@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_tool_choice_gives_a_valid_call_streamed_and_not(agent, choice):
    name = "get_weather" if choice == "required" else "get_time"
    for ask in ASKS[:2]:
        messages = [{"role": "user", "content": ask}]
        whole = agent.client.chat.completions.create(model=agent.model, messages=messages, tools=[WEATHER, TIME],
                                                     tool_choice=choice, temperature=0, max_tokens=120)
        choice_ = whole.choices[0]
        assert choice_.finish_reason == "tool_calls" and len(choice_.message.tool_calls) == 1, choice_
        if choice == "required":
            name = choice_.message.tool_calls[0].function.name
        assert_weather_call(choice_.message.tool_calls[0], name)
        chunks = list(agent.client.chat.completions.create(model=agent.model, messages=messages, tools=[WEATHER, TIME],
                                                           tool_choice=choice, temperature=0, max_tokens=120,
                                                           stream=True))
        deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert len(deltas) == 1 and deltas[0][0].index == 0
        assert deltas[0][0].function.arguments == choice_.message.tool_calls[0].function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_result_turn_follows_a_call(agent):
    messages = [{"role": "user", "content": ASKS[0]}]
    first = agent.client.chat.completions.create(model=agent.model, messages=messages, tools=[WEATHER],
                                                 tool_choice="required", temperature=0, max_tokens=120)
    call = first.choices[0].message.tool_calls[0]
    # the agent's second turn: an assistant message with content null and its tool_calls, then the result
    follow = messages + [first.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    assert follow[1].get("content") is None and follow[1]["tool_calls"]
    reply = agent.client.chat.completions.create(model=agent.model, messages=follow, tools=[WEATHER], temperature=0,
                                                 max_tokens=16)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls") and reply.usage.prompt_tokens > 40


def test_tool_calls_are_read_back_from_the_models_own_text():
    fmt = FORMATS[0]
    text = ('Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}</tool_call>'
            ' <tool_call>not json</tool_call>')
    content, calls = split_calls(fmt, text)
    assert [c.name for c in calls] == ["get_weather"] and json.loads(calls[0].arguments)["city"] == "Oslo"
    assert content == "Let me look.  <tool_call>not json</tool_call>"
    mistral = next(f for f in FORMATS if f.name == "mistral")
    _, calls = split_calls(mistral, '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]')
    assert [c.name for c in calls] == ["a", "b"]
    with pytest.raises(ApiError, match="does not render tools"):
        chat_tools({"tools": [WEATHER]}, CHAT_TEMPLATE)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 60), max_size=6))
def test_a_streamed_tool_call_is_found_wherever_the_pieces_split(cuts):
    text = ('ok <tool_c <tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call> then'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "F"}}</tool_call>')
    stream, content, calls, at = ToolStream(FORMATS[0]), "", [], 0
    for cut in sorted(set(min(c, len(text)) for c in cuts)) + [len(text)]:
        more, found = stream.feed(text[at:cut])
        content, calls, at = content + more, calls + found, cut
    more, found = stream.flush()
    assert content + more == "ok <tool_c  then" and [c.name for c in calls + found] == ["get_time", "get_weather"]


# ---------------------------------------------------------------------- structured output

def valid_person(text: str) -> None:
    value = json.loads(text)
    assert set(value) == set(PERSON["properties"]) and isinstance(value["name"], str) and len(value["name"]) <= 30
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 150 and isinstance(value["pet"], bool)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 5}])
def test_json_schema_and_json_object_are_valid_every_time(agent, sampling):
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for ask in ASKS:
        messages = [{"role": "user", "content": ask}]
        reply = agent.client.chat.completions.create(model=agent.model, messages=messages, response_format=schema,
                                                     max_tokens=200, **sampling).choices[0]
        assert reply.finish_reason == "stop", reply
        valid_person(reply.message.content)
        reply = agent.client.chat.completions.create(model=agent.model, messages=messages, max_tokens=200,
                                                     response_format={"type": "json_object"}, **sampling).choices[0]
        assert reply.finish_reason == "stop" and isinstance(json.loads(reply.message.content), dict), reply
    streamed = agent.client.chat.completions.create(model=agent.model, messages=[{"role": "user", "content": ASKS[1]}],
                                                    response_format=schema, max_tokens=200, stream=True, **sampling)
    valid_person("".join(c.choices[0].delta.content or "" for c in streamed if c.choices))


@pytest.mark.parametrize("body, fragment", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "schema"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "'fly'"),
    ({"tool_choice": "required"}, "needs 'tools'"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"reasoning_effort": "high"}, "'reasoning_effort' is not supported"),
    ({"top_logprobs": 3}, "needs 'logprobs'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "'image_url'"),
    ({"messages": [{"role": "user", "content": None}]}, "'content' is required"),
])
def test_what_a_chat_request_cannot_have_is_a_400_naming_it(agent, body, fragment):
    reply = post(agent, "/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **body})
    assert reply.status_code == 400 and fragment in reply.json()["error"]["message"], reply.text


# ---------------------------------------------------------------------- what clients send

def test_content_parts_are_joined_and_metadata_is_accepted(agent):
    def ask(content, **extra):
        return agent.client.chat.completions.create(model=agent.model, messages=[{"role": "user", "content": content}],
                                                    temperature=0, max_tokens=12, **extra).choices[0].message.content
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    assert ask(parts, user="u1", metadata={"k": "v"}, store=False) == ask("Hello\nthere")


def test_chat_logprobs_are_the_models_own(agent, example):
    from fate.runtime import Engine

    reply = agent.client.chat.completions.create(model=agent.model, messages=[{"role": "user", "content": "Hi"}],
                                                 temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    engine = Engine.load(example)
    ids = engine.codec.chat_ids([{"role": "user", "content": "Hi"}])
    for entry in content:  # greedy: the chosen token is the likeliest, and its score is log_softmax of the logits
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].token == entry.token
    expected = log_softmax(engine.logits(ids)[-1:])[0]
    assert content[0].logprob == pytest.approx(float(expected.max()), abs=1e-4)
    streamed = agent.client.chat.completions.create(model=agent.model, messages=[{"role": "user", "content": "Hi"}],
                                                    temperature=0, max_tokens=8, logprobs=True, stream=True)
    scored = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert scored == pytest.approx([e.logprob for e in content])
    engine.close()


def test_completions_echo_with_logprobs(agent, example):
    from fate.runtime import Engine

    reply = post(agent, "/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "echo": True,
                                         "logprobs": 2}).json()
    choice = reply["choices"][0]
    assert choice["text"].startswith(PROMPT)
    scores = choice["logprobs"]
    prompt_n = reply["usage"]["prompt_tokens"]
    assert len(scores["tokens"]) == prompt_n + 6 and scores["token_logprobs"][0] is None
    assert "".join(scores["tokens"]) == choice["text"]
    assert scores["text_offset"][1] == len(scores["tokens"][0])
    engine = Engine.load(example)
    ids = engine.encode(PROMPT)
    rows = log_softmax(engine.logits(ids))
    want = [float(rows[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert scores["token_logprobs"][1:prompt_n] == pytest.approx(want, abs=1e-4)
    engine.close()
    plain = post(agent, "/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "echo": True}).json()
    assert plain["choices"][0]["text"] == choice["text"] and plain["choices"][0]["logprobs"] is None


def test_penalties_and_min_p_as_defined():
    logits = np.array([3.0, 2.0, 1.0, -1.0, 0.5])
    penalized = Sampler(SamplingConfig(repetition_penalty=2.0), prompt_ids=[0, 3])
    assert penalized._adjusted(logits) == pytest.approx([1.5, 2.0, 1.0, -2.0, 0.5])
    sampler = Sampler(SamplingConfig(presence_penalty=0.5, frequency_penalty=1.0))
    sampler.generated.update([1, 1, 2])
    assert sampler._adjusted(logits) == pytest.approx([3.0, -0.5, -0.5, -1.0, 0.5])
    assert Sampler(SamplingConfig(logit_bias=((4, 10.0),)))(logits) == 4
    only_best = Sampler(SamplingConfig(greedy=False, min_p=0.9, seed=1))
    assert {only_best(logits) for _ in range(50)} == {0}


def test_penalties_reach_the_model_through_the_api(agent):
    def text(**extra):
        return post(agent, "/completions", {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, **extra}).json()
    base, penalized = text(), text(frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=1.5)
    assert base["choices"][0]["text"] != penalized["choices"][0]["text"]


# ---------------------------------------------------------------------- routes, key, CORS, names

def test_models_routes_and_unknown_routes(agent, example):
    listed = httpx.get(f"{agent.base}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()["data"]
    entry = httpx.get(f"{agent.base}/models/{agent.model}", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60).json()
    assert listed == [entry] and entry["context_length"] == 1024 and "int4" in entry["quantization"]
    assert entry["size_bytes"] == sum(p.stat().st_size for p in example.rglob("*") if p.is_file())
    assert agent.client.models.retrieve(agent.model).id == agent.model
    missing = httpx.get(f"{agent.base}/nothing", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(f"{agent.base}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]["message"]


def test_the_api_key_guards_the_api_but_not_the_page(agent):
    for key in (None, "wrong"):
        reply = post(agent, "/completions", {"prompt": PROMPT, "max_tokens": 2}, key=key)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{agent.root}/metrics", timeout=60).status_code == 401
    assert httpx.get(f"{agent.root}/health", timeout=60).status_code == 200
    assert "<title>Fate chat</title>" in httpx.get(f"{agent.root}/", timeout=60).text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=agent.base, api_key="wrong", max_retries=0).models.list()


def test_cors_answers_the_allowed_origin_only(agent):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{agent.base}/chat/completions", headers={"Origin": ORIGIN, **preflight}, timeout=60)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{agent.base}/chat/completions", headers={"Origin": "http://evil.example", **preflight},
                          timeout=60)
    assert "access-control-allow-origin" not in other.headers
    simple = post(agent, "/completions", {"prompt": PROMPT, "max_tokens": 2}, Origin=ORIGIN)
    assert simple.headers["access-control-allow-origin"] == ORIGIN


def test_another_model_name_is_served_and_logged_unless_strict(agent, plain):
    assert post(agent, "/completions", {"model": "gpt-4o", "prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert agent.wait_for_log("names model 'gpt-4o'")
    strict = Served(plain, "--strict-model-name")
    try:
        reply = httpx.post(f"{strict.base}/completions", json={"model": "gpt-4o", "prompt": PROMPT}, timeout=60)
        assert reply.status_code == 404 and "does not exist" in reply.json()["error"]["message"]
        assert httpx.get(f"{strict.base}/models/gpt-4o", timeout=60).status_code == 404
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            strict.client.chat.completions.create(model=strict.model, messages=[{"role": "user", "content": "hi"}])
    finally:
        strict.close()


def test_chat_template_flag_on_serve_and_run(plain, tmp_path):
    template = Path(__file__).resolve().parents[1] / "examples" / "tiny-moe" / "chat_template.jinja"
    served = Served(plain, "--chat-template", str(template))
    try:
        reply = served.client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "hi"}],
                                                      tools=[WEATHER], tool_choice="required", max_tokens=120,
                                                      temperature=0)
        assert_weather_call(reply.choices[0].message.tool_calls[0])
    finally:
        served.close()
    run = subprocess.run([str(BIN / "fate-run"), str(plain), "-p", "hi", "-n", "3", "--greedy", "--json",
                          "--chat-template", str(template)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and json.loads(run.stdout)["text"] is not None, run.stderr
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for %}")
    run = subprocess.run([str(BIN / "fate-run"), str(plain), "-p", "hi", "--chat-template", str(bad)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1 and "--chat-template" in run.stderr


def test_a_public_address_without_a_key_is_warned_about(example):
    proc = subprocess.Popen([str(BIN / "fate-serve"), str(example), "--host", "0.0.0.0", "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(2)]
        assert "no --api-key" in lines[0] and " on http://" in lines[1], lines
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------- the chat page

def test_the_chat_page_streams_a_reply_in_a_real_browser(example):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = browser()
    served = Served(example, "--memory-budget", "50%")  # offloaded: the page shows the experts' line
    try:
        page.get(served.root + "/")
        wait = WebDriverWait(page, 120)
        wait.until(lambda p: served.model in p.find_element(By.ID, "model").text)
        assert "experts int4" in page.find_element(By.ID, "model").text  # what an offloaded run runs
        page.find_element(By.ID, "input").send_keys("Tell me a story")
        page.find_element(By.ID, "send").click()
        stats = wait.until(lambda p: p.find_elements(By.CSS_SELECTOR, ".assistant .stats"))
        reply = page.find_element(By.CSS_SELECTOR, ".assistant").text
        assert "tokens/s" in stats[0].text and "MB read per token" in stats[0].text, stats[0].text
        assert len(reply) > len(stats[0].text) and "error" not in page.find_element(
            By.CSS_SELECTOR, ".assistant").get_attribute("class")
        assert served.wait_for_log(" 200 prompt=")
    finally:
        page.quit()
        served.close()


# ---------------------------------------------------------------------- the README

def test_the_readme_server_examples_run_as_written(example, capsys):
    """Every command and program in the README's serving section, on the bundled model, with only the
    port changed (the server takes a free one)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Serving: OpenAI's HTTP API", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")[1::2]
    shell = next(b for b in blocks if "fate-serve out/tiny-moe" in b)
    programs = [b.removeprefix("python\n") for b in blocks if b.startswith("python\n")]
    start = next(line for line in shell.splitlines() if line.startswith("fate-serve "))
    flags = start.split("#")[0].split()[2:]
    served = Served(example, *flags)
    try:
        for line in (line for line in shell.splitlines() if line.startswith("curl ")):
            run = subprocess.run(line.replace("http://127.0.0.1:8080", served.root), shell=True, capture_output=True,
                                 text=True, timeout=300)
            assert run.returncode == 0 and '"error"' not in run.stdout and run.stdout, (line, run.stdout, run.stderr)
        assert programs
        for program in programs:
            exec(compile(program.replace("http://127.0.0.1:8080", served.root), "README.md", "exec"), {})
        printed = capsys.readouterr().out
        assert "get_weather {" in printed and "'age':" in printed, printed
    finally:
        served.close()


def test_a_served_archive_reports_its_own_size(example, tmp_path):
    """/v1/models' size_bytes for a .fate archive is the archive's, as for a folder it is its files'."""
    from fate.artifacts import pack_artifact
    from fate.runtime.server import _artifact_bytes

    archive = tmp_path / "tiny-moe.fate"
    pack_artifact(example, archive)
    assert _artifact_bytes(archive) == archive.stat().st_size > 0
