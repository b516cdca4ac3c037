"""The chat server for real: a `python -m webui --demo` subprocess on 127.0.0.1, a stock OpenAI
client, concurrent streams, limits, and headless Chromium driving the page."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "webui", "--demo", "--port", str(port), "--slots", "8",
                             "--chunk", "8", "--max-tokens", "24"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"server did not come up:\n{proc.stdout.read()}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def post(url, body, timeout=60):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_health_models_stats(server):
    assert get(server + "/health")["status"] == "ok"
    assert get(server + "/v1/models")["data"][0]["id"] == "nanochat-demo"
    stats = get(server + "/stats")
    assert stats["slots"] == 8 and stats["context"] == 512


def test_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=60, max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=8, n=2, seed=1)
    assert len(out.choices) == 2 and out.usage.completion_tokens > 0
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=8, n=2, seed=1)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=8, seed=1, stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == out.choices[0].message.content and finish in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="temperature must be between"):
        client.chat.completions.create(model=model, messages=messages, temperature=3)


@pytest.mark.parametrize("body, message", [
    ({}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "x"}] * 501}, "too many messages"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "message 0 is too long"),
    ({"messages": [{"role": "user", "content": "x" * 8000}, {"role": "assistant", "content": "y" * 8000}] * 2
      + [{"role": "user", "content": "z"}]}, "conversation is too long"),
    ({"messages": [{"role": "user", "content": "abc " * 1000}]}, "the model's context is 512"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, "max_tokens must be between"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 201}, "top_k must be between"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature must be between"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role must be"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]}, "does not alternate"),
])
def test_limits_answer_4xx_with_a_message(server, body, message):
    for path in ("/v1/chat/completions", "/chat/completions"):
        status, text = post(server + path, body)
        assert status == 400, text
        assert message in json.loads(text)["error"]["message"]


def test_sixteen_concurrent_streams(server):
    results = [None] * 16

    def stream(i):
        body = {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 16, "stream": True, "seed": i}
        req = urllib.request.Request(server + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        text, done, finish = "", False, None
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                line = line.decode().strip()
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["delta"].get("content") or ""
                    finish = choice["finish_reason"] or finish
        results[i] = (done, finish, text)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert all(r is not None and r[0] and r[1] in ("stop", "length") for r in results), results
    # the same seed alone gives the same text: batching with others changes nothing
    status, alone = post(server + "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "question 3"}], "max_tokens": 16, "seed": 3})
    assert json.loads(alone)["choices"][0]["message"]["content"] == results[3][2]
    assert get(server + "/stats")["peak_active_rows"] > 1, "requests were decoded one at a time"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_browser_chat_edit_regenerate(server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
            page.set_default_timeout(60_000)
            page.goto(server + "/")
            expect(page.locator("#model")).to_have_text("nanochat-demo")
            page.fill("#input", "/temperature 0")
            page.press("#input", "Enter")
            expect(page.locator("#settings")).to_contain_text("temperature=0")
            page.fill("#input", "Hello, who are you?")
            page.press("#input", "Enter")
            answer = page.locator(".msg.assistant").last
            expect(answer).to_have_attribute("data-state", "done")
            first = answer.locator(".body").inner_text()
            assert first.strip(), "no streamed text arrived"
            expect(page.locator(".msg.user .body")).to_have_text("Hello, who are you?")

            page.locator(".msg.user button.edit").click()
            page.locator(".msg.user textarea").fill("Tell me about the moon")
            page.locator(".msg.user button.save").click()
            expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done")
            expect(page.locator(".msg.user .body")).to_have_text("Tell me about the moon")
            assert page.locator(".msg").count() == 3  # the slash-command note, the question, the answer
            edited = page.locator(".msg.assistant .body").inner_text()
            assert edited.strip()

            page.locator(".msg.assistant button.regenerate").click()
            expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done")
            assert page.locator(".msg.assistant .body").inner_text() == edited  # greedy: same answer again

            page.fill("#input", "/clear")
            page.press("#input", "Enter")
            expect(page.locator(".msg.assistant")).to_have_count(0)
        finally:
            browser.close()
