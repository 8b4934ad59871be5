"""Synthetic retrieval data from any OpenAI-compatible chat endpoint (e5-mistral / NV-Embed-v2).

Two-step prompting (Wang et al. 2023, "Improving Text Embeddings with Large Language
Models"; used for NV-Embed-v2's synthetic data):

1. brainstorm: ask for a JSON list of diverse text-retrieval task descriptions;
2. generate: for every (task, example number), ask for one JSON object with a user
   query, a positive document and a hard negative document for that task.

Robustness: answers are validated (JSON, schema, non-empty, query ≠ documents); 429s,
5xx, timeouts, connection errors and invalid answers are retried with exponential
backoff (``Retry-After`` honoured); duplicate queries are regenerated. Output is an
append-only JSONL whose lines carry an ``id`` (``t<task>-e<example>``): a rerun after a
crash repairs a torn last line, skips finished ids and never writes one twice.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from embforge.atomic import atomic_write
from embforge.data.filtering import normalise_text
from embforge.errors import EmbforgeError


class SynthError(EmbforgeError):
    """The endpoint refused the request for good (e.g. 401, 404) or never gave a valid answer."""


@dataclass
class SynthConfig:
    endpoint: str  # base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1
    model: str
    output: str  # JSONL of examples; tasks are kept beside it in <output>.tasks.json
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key (may be unset)
    num_tasks: int = 20
    examples_per_task: int = 5
    temperature: float = 1.0
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_s: float = 1.0  # first retry delay; doubles each time, with jitter
    seed: int = 0


BRAINSTORM = (
    "Brainstorm a list of {n} potentially useful and diverse text retrieval tasks. For example: "
    "'Given a web search query, retrieve relevant passages that answer the query' or 'Retrieve company "
    "financial reports for a given stock ticker'. Each task must say what the query is and what the "
    "retrieved documents are. Answer with a JSON list of {n} strings only."
)
GENERATE = (
    "You have been assigned a retrieval task: {task}\n"
    "Write one example for this task as a JSON object with exactly these string fields:\n"
    '- "user_query": a query a user of this task would type;\n'
    '- "positive_document": a document (at least a few sentences) that answers or matches the query;\n'
    '- "hard_negative_document": a document that looks relevant but does not answer the query.\n'
    "Be creative and do not repeat earlier examples (this is example number {index}). "
    "Answer with the JSON object only."
)


class ChatClient:
    """Minimal OpenAI-compatible chat client (stdlib only) with retries and backoff."""

    def __init__(self, cfg: SynthConfig, stats: Counter, sleep=time.sleep):
        self.cfg, self.stats, self.sleep = cfg, stats, sleep
        self.key = os.environ.get(cfg.api_key_env)
        self.rng = random.Random(cfg.seed)

    def _post(self, messages: list[dict], seed: int) -> str:
        body = json.dumps(
            {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature, "seed": seed}
        )
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(
            self.cfg.endpoint.rstrip("/") + "/chat/completions", body.encode(), headers, method="POST"
        )
        with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
            payload = json.loads(resp.read().decode("utf-8"))
        return payload["choices"][0]["message"]["content"]

    def ask(self, prompt: str, parse, seed: int):
        """Send ``prompt``; return ``parse(answer)``, retrying transient failures and invalid answers."""
        delay = self.cfg.backoff_s
        last = "no attempt"
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.sleep(delay * (0.5 + self.rng.random()))
                delay *= 2
            try:
                self.stats["requests"] += 1
                return parse(self._post([{"role": "user", "content": prompt}], seed + 7919 * attempt))
            except urllib.error.HTTPError as exc:
                if exc.code == 429 or exc.code >= 500:
                    self.stats[f"retried: HTTP {exc.code}"] += 1
                    retry_after = exc.headers.get("Retry-After") if exc.headers else None
                    if retry_after and retry_after.replace(".", "", 1).isdigit():
                        delay = max(delay, float(retry_after))
                    last = f"HTTP {exc.code}"
                    continue
                raise SynthError(f"{self.cfg.endpoint}: HTTP {exc.code} {exc.reason} (not retried)") from exc
            except TimeoutError as exc:
                self.stats["retried: timeout"] += 1
                last = f"timeout: {exc}"
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                    self.stats["retried: timeout"] += 1
                else:
                    self.stats["retried: connection error"] += 1
                last = f"connection: {exc.reason}"
            except (
                ValueError,
                KeyError,
                IndexError,
                TypeError,
            ) as exc:  # bad JSON or schema, from the API or the model
                self.stats["retried: invalid answer"] += 1
                last = f"invalid answer: {exc}"
        raise SynthError(
            f"{self.cfg.endpoint}: no valid answer after {self.cfg.max_retries + 1} attempts (last: {last})"
        )


def _json_from(text: str):
    """The JSON value in a model answer, tolerating ```json fences and surrounding prose."""
    text = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError("no JSON value in the answer")
    return json.loads(text[start : max(text.rfind("}"), text.rfind("]")) + 1])


def parse_tasks(text: str) -> list[str]:
    tasks = _json_from(text)
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise ValueError("expected a non-empty JSON list of task strings")
    return [t.strip() for t in tasks]


def parse_example(text: str) -> dict[str, str]:
    ex = _json_from(text)
    fields = ("user_query", "positive_document", "hard_negative_document")
    if not isinstance(ex, dict) or not all(isinstance(ex.get(f), str) and ex[f].strip() for f in fields):
        raise ValueError(f"expected a JSON object with non-empty string fields {fields}")
    if ex["user_query"].strip() in (ex["positive_document"].strip(), ex["hard_negative_document"].strip()):
        raise ValueError("the query repeats a document")
    if ex["positive_document"].strip() == ex["hard_negative_document"].strip():
        raise ValueError("positive and hard negative are identical")
    return {f: ex[f].strip() for f in fields}


def _load_done(path: Path, stats: Counter) -> tuple[set[str], set[str]]:
    """Ids and normalised queries already written; a torn last line (crash mid-write) is cut off."""
    ids, queries = set(), set()
    if not path.is_file():
        return ids, queries
    data = path.read_bytes()
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            break
        ids.add(obj["id"])
        queries.add(normalise_text(obj["query"]))
        good += len(line)
    if good < len(data):
        stats["repaired: torn last line removed"] += 1
        with path.open("r+b") as f:
            f.truncate(good)
    return ids, queries


def generate(cfg: SynthConfig, sleep=time.sleep, progress=None) -> Counter:
    """Run (or resume) the pipeline; return counts of requests, retries, written, duplicates."""
    stats: Counter = Counter()
    client = ChatClient(cfg, stats, sleep)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tasks_file = out.with_name(out.name + ".tasks.json")
    if tasks_file.is_file():
        tasks = json.loads(tasks_file.read_text(encoding="utf-8"))
    else:
        tasks = client.ask(BRAINSTORM.format(n=cfg.num_tasks), parse_tasks, cfg.seed)[: cfg.num_tasks]
        atomic_write(tasks_file, lambda tmp: tmp.write_text(json.dumps(tasks, indent=1), encoding="utf-8"))
    done_ids, seen_queries = _load_done(out, stats)
    stats["already done"] = len(done_ids)
    with out.open("a", encoding="utf-8") as f:
        for ti, task in enumerate(tasks):
            for ei in range(cfg.examples_per_task):
                ex_id = f"t{ti}-e{ei}"
                if ex_id in done_ids:
                    continue
                for attempt in range(cfg.max_retries + 1):
                    ex = client.ask(
                        GENERATE.format(task=task, index=ei + 1),
                        parse_example,
                        cfg.seed + 1000 * ti + 10 * ei + 100_003 * attempt,
                    )
                    key = normalise_text(ex["user_query"])
                    if key not in seen_queries:
                        break
                    stats["regenerated: duplicate query"] += 1
                else:
                    raise SynthError(f"{ex_id}: the endpoint kept returning queries that already exist")
                seen_queries.add(key)
                record = {
                    "id": ex_id,
                    "query": ex["user_query"],
                    "positive": ex["positive_document"],
                    "negatives": [ex["hard_negative_document"]],
                    "instruction": task,
                    "source": "synthetic",
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                stats["written"] += 1
                if progress is not None:
                    progress(1)
    return stats
