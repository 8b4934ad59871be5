"""Synthetic retrieval data from any OpenAI-compatible chat endpoint (e5-mistral / NV-Embed-v2).

Two-step prompting (Wang et al. 2023, "Improving Text Embeddings with Large Language
Models"; used for NV-Embed-v2's synthetic data):

1. brainstorm: ask for a JSON list of diverse text-retrieval task descriptions;
2. generate: for every (task, example number), ask for one JSON object with a user
   query, a positive document and a hard negative document for that task.

Robustness: answers are validated (JSON, schema, non-empty, query ≠ documents); 429s,
5xx, timeouts, connection errors and invalid answers are retried with exponential
backoff (``Retry-After`` honoured, as seconds or as an HTTP date; transport by ``httpx``); duplicate queries are regenerated. Output is an
append-only JSONL whose lines carry an ``id`` (``t<task>-e<example>``): a rerun after a
crash repairs a torn last line, skips finished ids and never writes one twice.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from embforge.atomic import atomic_write
from embforge.data.cleaning import normalise_text
from embforge.data.records import TrainingRecord
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
    """OpenAI-compatible chat client over ``httpx`` with retries, backoff and ``Retry-After``.

    The retry policy is ours rather than the transport's because invalid answers (bad JSON,
    wrong schema) are retried like 429s, and every retry is counted in ``stats``.
    """

    def __init__(self, cfg: SynthConfig, stats: Counter, sleep=time.sleep, clock=time.time):
        self.cfg, self.stats, self.sleep, self.clock = cfg, stats, sleep, clock
        self.rng = random.Random(cfg.seed)
        key = os.environ.get(cfg.api_key_env)
        self.http = httpx.Client(
            base_url=cfg.endpoint.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=cfg.timeout_s,
        )

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def _post(self, messages: list[dict], seed: int) -> httpx.Response:
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature, "seed": seed}
        return self.http.post("chat/completions", json=body)

    def ask(self, prompt: str, parse, seed: int):
        """Send ``prompt``; return ``parse(answer)``, retrying transient failures and invalid answers.

        The wait before retry n is the exponential backoff (``backoff_s * 2**(n-1)``, jittered
        ×0.5–1.5) or the server's ``Retry-After`` (seconds or an HTTP date), whichever is longer.
        """
        delay = self.cfg.backoff_s
        wait_at_least = 0.0
        last = "no attempt"
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.sleep(max(delay * (0.5 + self.rng.random()), wait_at_least))
                delay *= 2
            wait_at_least = 0.0
            try:
                self.stats["requests"] += 1
                resp = self._post([{"role": "user", "content": prompt}], seed + 7919 * attempt)
            except httpx.TimeoutException as exc:
                self.stats["retried: timeout"] += 1
                last = f"timeout: {exc!r}"
                continue
            except httpx.TransportError as exc:
                self.stats["retried: connection error"] += 1
                last = f"connection: {exc!r}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                self.stats[f"retried: HTTP {resp.status_code}"] += 1
                wait_at_least = retry_after_seconds(resp.headers.get("Retry-After"), self.clock())
                last = f"HTTP {resp.status_code}"
                continue
            if resp.status_code >= 400:
                raise SynthError(f"{self.cfg.endpoint}: HTTP {resp.status_code} {resp.reason_phrase} (not retried)")
            try:
                return parse(resp.json()["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError) as exc:  # bad JSON or schema, API or model
                self.stats["retried: invalid answer"] += 1
                last = f"invalid answer: {exc}"
        raise SynthError(
            f"{self.cfg.endpoint}: no valid answer after {self.cfg.max_retries + 1} attempts (last: {last})"
        )


def retry_after_seconds(value: str | None, now: float) -> float:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3), 0 when absent or invalid.

    Args:
        value: delay-seconds (``"120"``; fractions accepted) or an HTTP date
            (``"Wed, 21 Oct 2015 07:28:00 GMT"``).
        now: the current time, seconds since the epoch (for the date form).
    """
    if not value:
        return 0.0
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return 0.0
    return max(seconds, 0.0) if math.isfinite(seconds) else 0.0


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
    with ChatClient(cfg, stats, sleep) as client:
        _generate(cfg, client, stats, progress)
    return stats


def _generate(cfg: SynthConfig, client: ChatClient, stats: Counter, progress) -> None:
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
                example = TrainingRecord(
                    ex["user_query"], [ex["positive_document"]], [ex["hard_negative_document"]], "synthetic", task
                )
                record = {"id": ex_id, **example.to_dict()}  # the task is the query's instruction in training
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                stats["written"] += 1
                if progress is not None:
                    progress(1)
