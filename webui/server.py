"""The chat server: a Flask app over one continuously batched engine.

Every request (the page's, or the OpenAI-compatible API's) becomes an engine `Request` submitted to
one shared `Batch`; a single scheduler thread steps that batch whenever anything is in flight, so
concurrent conversations decode together in the same device calls. Handlers only validate, submit
and relay the request's events — as server-sent events when streaming.

Endpoints: GET / (the chat page), POST /chat/completions (the page's SSE stream), POST
/v1/chat/completions (OpenAI format, stream or not), GET /v1/models, GET /health, GET /stats.
"""

import json
import os
import secrets
import threading
import time
import traceback

from flask import Flask, Response, jsonify, request, send_from_directory

# Limits against abuse: beyond them a request is refused with a 400 and a message saying which.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_CONVERSATION_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)  # 0 = no top-k cut
MAX_TOKENS_RANGE = (1, 4096)
MAX_SAMPLES = 8
EVENT_TIMEOUT_S = 120  # a stream waits at most this long for the next tokens before giving up

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


class ClientError(ValueError):
    """A client mistake, answered with this status and message as JSON."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ChatService:
    """The engine, its batch, and the thread that steps it."""

    def __init__(self, engine, *, slots: int, model_name: str, defaults: dict):
        self.engine, self.model_name, self.defaults = engine, model_name, defaults
        self.batch = engine.new_batch(slots)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.started = time.time()
        self.counts = {"requests": 0, "tokens": 0, "errors": 0, "peak_active_rows": 0}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def submit(self, tokens, **sampling):
        from nanochat_jax.engine import Request

        try:
            req = self.batch.submit(Request(tokens, **sampling))
        except ValueError as e:
            raise ClientError(str(e)) from None
        self.counts["requests"] += 1
        self._wake.set()
        return req

    def _loop(self):
        while not self._stop.is_set():
            self._wake.clear()
            if not self.batch.busy():
                self._wake.wait(timeout=0.5)
                continue
            try:
                self.batch.step()
            except Exception:  # keep serving; the failing step is logged
                self.counts["errors"] += 1
                traceback.print_exc()
                time.sleep(0.5)
            self.counts["peak_active_rows"] = max(self.counts["peak_active_rows"], self.batch.active_rows())

    def close(self):
        self._stop.set()
        self._wake.set()

    # ---- requests -----------------------------------------------------------------------------

    def parse(self, body) -> tuple[list[int], dict, int]:
        """(prompt ids, sampling kwargs, n) of a chat request body, or ClientError."""
        if not isinstance(body, dict):
            raise ClientError("the request body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ClientError("'messages' must be a non-empty list")
        if len(messages) > MAX_MESSAGES:
            raise ClientError(f"too many messages: {len(messages)} (at most {MAX_MESSAGES})")
        clean, total = [], 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ClientError(f"message {i}: role must be 'system', 'user' or 'assistant'")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str) or not content:
                raise ClientError(f"message {i}: content must be a non-empty string")
            if len(content) > MAX_MESSAGE_CHARS:
                raise ClientError(f"message {i} is too long: {len(content)} characters (at most {MAX_MESSAGE_CHARS})")
            total += len(content)
            clean.append({"role": m["role"], "content": content})
        if total > MAX_CONVERSATION_CHARS:
            raise ClientError(f"the conversation is too long: {total} characters (at most {MAX_CONVERSATION_CHARS})")
        if clean[-1]["role"] != "user":
            raise ClientError("the last message must be the user's")

        temperature = _number(body, "temperature", self.defaults["temperature"], *TEMPERATURE_RANGE)
        top_k = int(_number(body, "top_k", self.defaults["top_k"], *TOP_K_RANGE, integer=True))
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p <= 0:
            raise ClientError("top_p must be in (0, 1]")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = int(_number({"max_tokens": max_tokens}, "max_tokens", self.defaults["max_tokens"],
                                 *MAX_TOKENS_RANGE, integer=True))
        n = int(_number(body, "n", 1, 1, MAX_SAMPLES, integer=True))
        seed = body.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise ClientError("seed must be an integer")

        tokenizer = self.engine.tokenizer
        try:
            tokens = tokenizer.render_for_completion({"messages": clean + [{"role": "assistant", "content": ""}]},
                                                     max_tokens=10**9)
        except ValueError as e:
            raise ClientError(str(e)) from None
        room = self.batch.cache_len - len(tokens)
        if room < 1:
            raise ClientError(f"the conversation is {len(tokens)} tokens; the model's context is "
                             f"{self.batch.cache_len}: start a new conversation")
        sampling = dict(max_tokens=min(max_tokens, room), temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=secrets.randbits(31) if seed is None else seed, num_samples=n)
        return tokens, sampling, n

    def relay(self, req, on_text):
        """Feed (sample, text) to on_text as tokens arrive; whole characters only. Cancels the
        request if the consumer goes away (GeneratorExit) or nothing arrives for too long."""
        import queue

        decoders = [self.engine.tokenizer.stream_decoder() for _ in req.samples]
        try:
            while True:
                try:
                    event = req.events.get(timeout=EVENT_TIMEOUT_S)
                except queue.Empty:
                    raise TimeoutError(f"no tokens for {EVENT_TIMEOUT_S} s") from None
                if event is None:
                    break
                sample, ids = event
                self.counts["tokens"] += len(ids)
                text = "".join(decoders[sample].push(t) for t in ids)
                if text:
                    yield from on_text(sample, text)
            for sample, d in enumerate(decoders):
                tail = d.flush()
                if tail:
                    yield from on_text(sample, tail)
        finally:
            if not req.done:
                req.cancel()
                self._wake.set()


def _number(body, key, default, low, high, integer=False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
        raise ClientError(f"{key} must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:
        raise ClientError(f"{key} must be between {low} and {high}, got {value}")
    return value


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(service: ChatService) -> Flask:
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 2 * MAX_CONVERSATION_CHARS * 4 + 65536  # bytes; 413 beyond

    @app.errorhandler(ClientError)
    def bad_request(e):
        return jsonify({"error": {"message": str(e), "type": "invalid_request_error"}}), e.status

    @app.errorhandler(413)
    def too_large(e):
        return jsonify({"error": {"message": "request body too large", "type": "invalid_request_error"}}), 413

    @app.errorhandler(404)
    def not_found(e):
        return jsonify({"error": {"message": f"no such endpoint: {request.path}", "type": "not_found"}}), 404

    @app.errorhandler(405)
    def wrong_method(e):
        return jsonify({"error": {"message": f"{request.method} is not allowed on {request.path}",
                                  "type": "invalid_request_error"}}), 405

    def body():
        data = request.get_json(silent=True)
        if data is None:
            raise ClientError("the request body must be JSON (Content-Type: application/json)")
        return data

    @app.get("/")
    def index():
        return send_from_directory(STATIC_DIR, "index.html")

    @app.get("/health")
    def health():
        return jsonify({"status": "ok", "model": service.model_name})

    @app.get("/stats")
    def stats():
        return jsonify({"model": service.model_name, "slots": service.batch.slots,
                        "context": service.batch.cache_len, "active_rows": service.batch.active_rows(),
                        "waiting_requests": service.batch.waiting(), "uptime_s": round(time.time() - service.started, 1),
                        **service.counts})

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                    "created": int(service.started), "owned_by": "nanochat"}]})

    @app.post("/chat/completions")
    def page_completion():
        """The page's stream: {"token": text} events, then {"done": true, "finish_reason": ...}."""
        tokens, sampling, _ = service.parse(body())
        req = service.submit(tokens, **{**sampling, "num_samples": 1})

        def events():
            yield from service.relay(req, lambda sample, text: [_sse({"token": text})])
            yield _sse({"done": True, "finish_reason": req.samples[0].finish_reason})

        return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    def openai_completion():
        data = body()
        tokens, sampling, n = service.parse(data)
        req = service.submit(tokens, **sampling)
        completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": completion_id, "created": created, "model": service.model_name}

        def reason(s):
            return "length" if s.finish_reason == "length" else "stop"

        if not data.get("stream"):
            texts = [""] * n
            for sample, text in service.relay(req, lambda sample, text: [(sample, text)]):
                texts[sample] += text
            completion_tokens = sum(len(s.tokens) for s in req.samples)
            return jsonify({**head, "object": "chat.completion", "choices": [
                {"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reason(s),
                 "logprobs": None} for i, s in enumerate(req.samples)],
                "usage": {"prompt_tokens": len(tokens), "completion_tokens": completion_tokens,
                          "total_tokens": len(tokens) + completion_tokens}})

        def chunk(i, delta, finish=None):
            return _sse({**head, "object": "chat.completion.chunk",
                         "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        def events():
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            yield from service.relay(req, lambda sample, text: [chunk(sample, {"content": text})])
            for i, s in enumerate(req.samples):
                yield chunk(i, {}, reason(s))
            yield "data: [DONE]\n\n"

        return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
