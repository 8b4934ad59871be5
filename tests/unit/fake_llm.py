"""A local fake OpenAI-compatible chat endpoint with scripted failures (for tests)."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeLLM:
    """Serves /chat/completions on 127.0.0.1; ``script`` modes are used in turn, then "ok".

    Modes: ok, 429, 500, timeout (sleeps past the client's timeout), not_json (HTTP body is
    not JSON), bad_json (the message is not JSON), bad_schema (JSON without the fields),
    duplicate (repeats the previous example's query), 503 (with ``Retry-After`` too).
    ``retry_after`` is the header sent with 429 and 503 (delay-seconds or an HTTP date).
    """

    def __init__(self, script=(), delay=0.0, sleep_for_timeout=1.0, retry_after="0"):
        self.script = list(script)
        self.retry_after = retry_after
        self.delay, self.sleep_for_timeout = delay, sleep_for_timeout
        self.lock = threading.Lock()
        self.counter = itertools.count()
        self.requests = 0
        self.last_query = "first query"
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.handle(self, body["messages"][0]["content"])

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that timed out closed its socket: nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _mode(self) -> str:
        with self.lock:
            self.requests += 1
            return self.script.pop(0) if self.script else "ok"

    def handle(self, h, prompt: str) -> None:
        mode = self._mode()
        time.sleep(self.delay)
        if mode in ("429", "500", "503"):
            h.send_response(int(mode))
            if mode in ("429", "503"):
                h.send_header("Retry-After", self.retry_after)
            h.end_headers()
            return
        if mode == "timeout":
            time.sleep(self.sleep_for_timeout)
        if mode == "not_json":
            return self._send(h, b"<html>oops</html>")
        if "Brainstorm" in prompt:
            n = int(re.search(r"list of (\d+)", prompt).group(1))
            content = "```json\n" + json.dumps([f"Retrieve documents about topic {i}" for i in range(n)]) + "\n```"
        elif "Passage: " in prompt:  # embforge adapt: a query for a passage
            words = re.search(r"Passage: (.*)", prompt).group(1).split()[:4]
            content = json.dumps({"query": "what about " + " ".join(words)})
        elif mode == "bad_json":
            content = "Sure! Here is your example: user_query = ..."
        elif mode == "bad_schema":
            content = json.dumps({"query": "missing the right fields"})
        else:
            task = re.search(r"retrieval task: (.*)\n", prompt).group(1)
            k = next(self.counter)
            query = self.last_query if mode == "duplicate" else f"{task} question {k}"
            if mode != "timeout":  # the client never sees an answer that came too late
                self.last_query = query
            content = json.dumps(
                {
                    "user_query": query,
                    "positive_document": f"An answer about {task}, number {k}.",
                    "hard_negative_document": f"Something else entirely, number {k}.",
                }
            )
        self._send(h, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

    @staticmethod
    def _send(h, payload: bytes) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
