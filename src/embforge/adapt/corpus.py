"""A user's BEIR folder read for ``embforge adapt``, and training pairs made from it.

``corpus.jsonl`` is required; ``queries.jsonl`` with ``qrels/train.tsv`` adds labelled pairs
(no other qrels file is ever read: dev and test judgements stay unseen). Every problem names
its file and line. Without labels, pairs come from the corpus alone:

- **title → text** where a passage has a title;
- **a sentence → the rest of its passage** (the inverse cloze task): the first sentence, and
  one other sentence drawn with the seed, each paired with the passage without it;
- **a definition → "what is X"**: a sentence that defines its subject ("X is a ...", "X refers
  to ...") gives the question a user would ask, paired with the passage without that sentence;
- **a fragment → the rest**: a few consecutive words of one sentence (a keyword-style query,
  Contriever-like cropping), paired with the passage without that sentence;
- optionally **LLM-written queries** for sampled passages (:func:`llm_queries`).

Each pair remembers the corpus id it came from, so the consistency filter and the miner know
which corpus passage is its positive.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from embforge.data.io import iter_jsonl, read_qrels
from embforge.errors import DataError

MIN_QUERY_WORDS = 4  # a sentence shorter than this is no query
MIN_REST_WORDS = 8  # nor is a passage remainder shorter than this a positive
FRAGMENT_WORDS = (4, 9)  # a fragment query's length range, in words
# "X is a ...", "An X (XY) refers to ...": the subject X of a defining sentence
_DEFINITION = re.compile(
    r"^(?:An? |The )?(?P<subject>[A-Za-z][\w\-' ]{1,60}?)(?: \([^)]{1,30}\))?,? "
    r"(?P<verb>is|are|refers? to|means)\b (?:an?|the|one|any|used|defined|when|a type|a kind)\b"
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


@dataclass
class Pair:
    query: str
    positive: str
    doc_id: str  # the corpus passage the positive is (or is cut from)
    kind: str  # labelled | title | first-sentence | sentence | definition | fragment | llm


@dataclass
class AdaptData:
    ids: list[str]  # corpus ids, file order
    texts: list[str]  # "title text", as retrieval embeds them
    titles: list[str]
    bodies: list[str]
    labelled: list[Pair] = field(default_factory=list)

    def text_of(self, doc_id: str) -> str:
        return self.texts[self.position[doc_id]]

    @property
    def position(self) -> dict[str, int]:
        if not hasattr(self, "_position"):
            self._position = {d: i for i, d in enumerate(self.ids)}
        return self._position


def read_folder(folder: str | Path) -> AdaptData:
    """The corpus (and labelled training pairs, where ``queries.jsonl`` and ``qrels/train.tsv`` exist)."""
    folder = Path(folder)
    corpus_file = folder / "corpus.jsonl"
    if not corpus_file.is_file():
        raise DataError(f"{folder}: no corpus.jsonl (embforge adapt needs a BEIR folder with at least a corpus)")
    ids, titles, bodies, seen = [], [], [], set()
    for lineno, row in iter_jsonl(corpus_file):
        where = f"{corpus_file}:{lineno}"
        if "_id" not in row or not isinstance(row.get("text"), str):
            raise DataError(f"{where}: a corpus line needs '_id' and a string 'text'; it has {sorted(row)}")
        doc_id, title = str(row["_id"]), row.get("title") or ""
        if not isinstance(title, str):
            raise DataError(f"{where}: 'title' must be a string, got {type(title).__name__}")
        if doc_id in seen:
            raise DataError(f"{where}: corpus id {doc_id!r} appears twice")
        if not (title + row["text"]).strip():
            raise DataError(f"{where}: passage {doc_id!r} has neither title nor text")
        seen.add(doc_id)
        ids.append(doc_id)
        titles.append(title.strip())
        bodies.append(row["text"].strip())
    if not ids:
        raise DataError(f"{corpus_file}: the corpus is empty")
    data = AdaptData(ids, [f"{t} {b}".strip() for t, b in zip(titles, bodies)], titles, bodies)
    queries_file, qrels_file = folder / "queries.jsonl", folder / "qrels" / "train.tsv"
    if queries_file.is_file() != qrels_file.is_file():
        have, lacks = (queries_file, qrels_file) if queries_file.is_file() else (qrels_file, queries_file)
        raise DataError(f"{folder}: {have.name} without {lacks.relative_to(folder)}; labelled pairs need both")
    if queries_file.is_file():
        data.labelled = _labelled_pairs(data, queries_file, qrels_file)
    return data


def _labelled_pairs(data: AdaptData, queries_file: Path, qrels_file: Path) -> list[Pair]:
    queries = {}
    for lineno, row in iter_jsonl(queries_file):
        if "_id" not in row or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{queries_file}:{lineno}: a query line needs '_id' and a non-empty string 'text'")
        queries[str(row["_id"])] = row["text"].strip()
    pairs = []
    for lineno, query_id, doc_id, score in _qrels_rows(qrels_file):
        if query_id not in queries:
            raise DataError(f"{qrels_file}:{lineno}: query id {query_id!r} is not in {queries_file.name}")
        if doc_id not in data.position:
            raise DataError(f"{qrels_file}:{lineno}: corpus id {doc_id!r} is not in corpus.jsonl")
        if score > 0:
            pairs.append(Pair(queries[query_id], data.text_of(doc_id), doc_id, "labelled"))
    if not pairs:
        raise DataError(f"{qrels_file}: no pair with a score > 0")
    return pairs


def _qrels_rows(path: Path):
    """(line, query id, corpus id, score) of each qrels row; ``read_qrels`` checks header, columns and scores."""
    read_qrels(path)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        for lineno, row in enumerate(reader, start=2):
            if row:
                yield lineno, row[0], row[1], int(float(row[2]))


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def pseudo_queries(data: AdaptData, seed: int = 0) -> list[Pair]:
    """Structural pairs from the corpus alone (see the module doc), in corpus order."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    for doc_id, text, title, body in zip(data.ids, data.texts, data.titles, data.bodies):
        if text in seen:  # a passage stored twice gives its pairs once
            continue
        seen.add(text)
        if title and len(body.split()) >= MIN_REST_WORDS:
            pairs.append(Pair(title, body, doc_id, "title"))
        parts = sentences(body)
        if len(parts) < 2:
            continue
        choices = [0] + ([rng.randrange(1, len(parts))] if len(parts) > 2 else [])
        for i in choices:
            query, rest = parts[i], " ".join(parts[:i] + parts[i + 1 :])
            if len(query.split()) >= MIN_QUERY_WORDS and len(rest.split()) >= MIN_REST_WORDS:
                rest = f"{title} {rest}".strip()
                pairs.append(Pair(query, rest, doc_id, "first-sentence" if i == 0 else "sentence"))
        pairs += _question_pairs(parts, title, doc_id, rng)
    return pairs


def definition_question(sentence: str) -> str | None:
    """ "Gradient descent is an optimisation algorithm ..." -> "what is gradient descent" (None: not a definition)."""
    match = _DEFINITION.match(sentence)
    if match is None:
        return None
    subject = match["subject"].strip()
    if len(subject.split()) > 6 or subject.lower() in {"it", "this", "that", "there", "here", "they", "these"}:
        return None
    words = [w if (w.isupper() and len(w) > 1) else w.lower() for w in subject.split()]
    return f"what {'are' if match['verb'] == 'are' else 'is'} {' '.join(words)}"


def _question_pairs(parts: list[str], title: str, doc_id: str, rng: random.Random) -> list[Pair]:
    """The definition question of the passage's defining sentence (if any) and one fragment query."""
    out = []
    for i, sentence in enumerate(parts):
        question = definition_question(sentence)
        rest = f"{title} {' '.join(parts[:i] + parts[i + 1 :])}".strip()
        if question and len(rest.split()) >= MIN_REST_WORDS:
            out.append(Pair(question, rest, doc_id, "definition"))
            break
    i = rng.randrange(len(parts))
    words = parts[i].rstrip(".!?").split()
    size = rng.randint(*FRAGMENT_WORDS)
    rest = f"{title} {' '.join(parts[:i] + parts[i + 1 :])}".strip()
    if len(words) > size and len(rest.split()) >= MIN_REST_WORDS:
        start = rng.randrange(len(words) - size + 1)
        query = " ".join(words[start : start + size]).strip(" ,;:()[]-—–")
        if len(query.split()) >= MIN_QUERY_WORDS:
            out.append(Pair(query, rest, doc_id, "fragment"))
    return out


LLM_PROMPT = (
    "Here is a passage from a document collection.\n\nPassage: {passage}\n\n"
    "Write one search query that a user of this collection might type and that this passage answers. "
    'Do not copy a sentence of the passage. Answer with a JSON object {{"query": "..."}} only.'
)


def _parse_query(text: str) -> str:
    from embforge.data.synthetic import _json_from

    obj = _json_from(text)
    if not isinstance(obj, dict) or not isinstance(obj.get("query"), str) or not obj["query"].strip():
        raise ValueError('expected a JSON object {"query": "..."}')
    return obj["query"].strip()


def llm_queries(data: AdaptData, endpoint: str, model: str, count: int, seed: int = 0, progress=None) -> list[Pair]:
    """Queries written by a chat model (OpenAI-compatible ``endpoint``) for ``count`` passages drawn with ``seed``."""
    from collections import Counter

    from embforge.data.synthetic import ChatClient, SynthConfig

    rng = random.Random(seed)
    chosen = rng.sample(range(len(data.ids)), min(count, len(data.ids)))
    cfg = SynthConfig(endpoint=endpoint, model=model, output="-", seed=seed)
    pairs = []
    with ChatClient(cfg, Counter()) as client:
        for n, i in enumerate(chosen):
            query = client.ask(LLM_PROMPT.format(passage=data.texts[i][:2000]), _parse_query, seed + n)
            pairs.append(Pair(query, data.texts[i], data.ids[i], "llm"))
            if progress is not None:
                progress(1)
    return pairs
