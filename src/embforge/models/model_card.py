"""The README.md (model card) of a saved folder: what the model is and how to embed with plain ``transformers``.

Its Python snippet is the contract for users without embforge: tests/unit/test_parity.py and
bench/parity.py extract it and run it in a process where ``import embforge`` fails, and
compare its embeddings with :meth:`Embedder.encode`.
"""

from __future__ import annotations

import json
from pathlib import Path

PATH_LINE = 'path = "."  # this folder'  # the line a reader (or a test) points at the folder

_EMBFORGE_SNIPPET = """import torch
from transformers import AutoModel, AutoTokenizer

{path_line}
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # a plain tokenizer: needs no code
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()


def embed(texts, prompt_name=None):
    batch = model.tokenize(tokenizer, texts, prompt_name=prompt_name)  # prompt, EOS, masks: as embforge does
    with torch.no_grad():
        return model(**batch).embeddings  # (N, {dim}){normalised}
"""

_PLAIN_SNIPPET = """import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

{path_line}
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path).eval()
PROMPTS = {prompts}


def embed(texts, prompt_name=None):
    prefix = PROMPTS[prompt_name] if prompt_name else ""
    texts = [{text_expr} for t in texts]
    batch = tokenizer(texts, padding=True, truncation=True, max_length={max_len}, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (N, T, {dim})
    mask = batch["attention_mask"]  # (N, T)
{pool}{layer_norm}    return {result}  # (N, {dim}){normalised}
"""

_POOL = {
    "mean": (
        "    weights = mask.unsqueeze(-1).to(hidden.dtype)\n"
        "    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # mean over real tokens\n"
    ),
    "cls": "    pooled = hidden[:, 0]  # the [CLS] token\n",
    "last": "    pooled = hidden[torch.arange(len(hidden)), mask.sum(1) - 1]  # the last real token (right padding)\n",
}


def snippet(embedder, *, plain: bool, path_line: str = PATH_LINE) -> str:
    """The Python code of the model card for ``embedder`` saved in the given layout."""
    head = embedder.head
    normalised = ", L2-normalised" if head.normalize else ""
    if not plain:
        return _EMBFORGE_SNIPPET.format(path_line=path_line, dim=embedder.hidden_size, normalised=normalised)
    layer_norm = ""
    if head.matryoshka_rule == "layer_norm":  # Nomic Embed v1.5's rule, before truncation
        layer_norm = (
            "    pooled = F.layer_norm(pooled, pooled.shape[-1:])  # before any truncation to fewer dimensions\n"
        )
    return _PLAIN_SNIPPET.format(
        path_line=path_line,
        prompts=json.dumps(head.prompts, ensure_ascii=False),
        text_expr="(prefix + t).lower()" if head.do_lower_case else "prefix + t",
        max_len=head.max_seq_len,
        dim=embedder.hidden_size,
        pool=_POOL[head.pooling_name],
        layer_norm=layer_norm,
        result="F.normalize(pooled, dim=-1)" if head.normalize else "pooled",
        normalised=normalised,
    )


def write_model_card(folder: Path, embedder, *, plain: bool) -> None:
    """Write ``folder/README.md``."""
    layout = "sentence-transformers" if plain else "embforge (remote code: the files of `embforge/modeling/`)"
    head = embedder.head
    prompts = ", ".join(f"`{k}`: {v!r}" for k, v in head.prompts.items()) or "none"
    usage = "SentenceTransformer(path)" if plain else "SentenceTransformer(path, trust_remote_code=True)"
    lines = [
        "---",
        "library_name: sentence-transformers",
        "tags: [embforge, sentence-transformers, feature-extraction]",
        "---",
        "# An embedding model saved by embforge",
        "",
        f"- layout: {layout}",
        f"- backbone: `{embedder.backbone.config.model_type}`, {embedder.hidden_size} dimensions, "
        f"pooling `{head.pooling_name}`, {head.attention} attention, at most {head.max_seq_len} tokens",
        f"- prompts: {prompts}" + ("; prompts are instructions, left out of pooling" if not head.pool_prompt else ""),
        "",
        "## sentence-transformers",
        "",
        *([] if plain else ["sentence-transformers 6.3 or newer (older releases put prompts into the text).", ""]),
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f"model = {usage}",
        'embeddings = model.encode(["how do I sort a list?"])',
        "```",
        "",
        "## transformers",
        "",
        "```python",
        snippet(embedder, plain=plain).rstrip(),
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
