"""Every command in docs/guide/ runs (issue 24): the guide is read from the Markdown, so a changed
flag breaks this test, not a reader.

Each page runs in its own scratch folder, block after block, as a reader would type them:

- a ```bash block runs as one ``bash -euo pipefail`` script (heredocs, pipes and ``&&`` as written);
- a ```python block runs with the checkout's Python;
- a ```console block holds ``$ command`` lines, each followed by the output it must print (every
  non-empty expected line must occur in the output, ``...`` stands for anything);
- ``<!-- guide: background -->`` before a block starts it and leaves it running (a server) until
  the page ends; the next block waits for the port its command names;
- ``<!-- guide: exit N -->`` before a console block: its commands must exit with status N (errors);
- ``<!-- guide: make -->`` before a block of ``make`` lines: they are the README's install
  commands, which CI itself runs (.ci/run); here each target must exist in the Makefile.

Tiny size: :data:`TINY` lists, page by page, the only edits made to the documented commands (fewer
steps, a tiny model built from a config in place of a 135M-parameter one). An edit whose text no
longer occurs in its page fails the test, so the list cannot go stale. Pages that train or evaluate
on ../shared/data skip with that reason where it is absent (a user's fresh clone).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "guide"
SHARED = REPO.parent / "shared"
BLOCK = re.compile(
    r"(?:<!--\s*guide:\s*(?P<mark>[^>]*?)\s*-->\s*\n)?```(?P<lang>bash|console|python)\n(?P<body>.*?)^```", re.S | re.M
)

# page -> (documented text, what the test runs instead); {tiny_bert} / {tiny_decoder} are model folders
TINY: dict[str, list[tuple[str, str]]] = {
    "quickstart.md": [("embforge quickstart --output-dir", "embforge quickstart --steps 2 --output-dir")],
    "your-data.md": [("steps: 200", "steps: 2"), ("http://localhost:8000/v1", "{llm_url}")],
    "adapt.md": [("--minutes 20", "--steps 2 --runs 1"), ("head -n 2000", "head -n 150")],
    "nv-embed.md": [
        (
            "src/embforge/recipes/nv_embed/cpu_smollm2.yaml",
            "src/embforge/recipes/nv_embed/cpu_smollm2.yaml --set model.name_or_path={tiny_decoder} "
            "--set stages.0.steps=2 --set stages.1.steps=2 --set model.max_seq_len=24 "
            "--set model.pooling.num_latents=16 --set stages.0.data.batch_size=4 --set stages.1.data.batch_size=4",
        ),
    ],
    "nomic-embed.md": [
        (
            "cpu_twin_mlm.yaml",
            "cpu_twin_mlm.yaml --set stages.0.steps=3 --set stages.0.eval_every=0 "
            "--set stages.0.mlm.heldout_max_chunks=8",
        ),
        ("steps: 60", "steps: 2"),
        (
            "cpu_twin_finetune.yaml \\",
            "cpu_twin_finetune.yaml --set stages.0.steps=2 --set stages.0.data.batch_size=4 \\",
        ),
        ("head -n 2000", "head -n 200"),
    ],
    "multi-gpu.md": [
        ("--nproc_per_node 8", "--nproc_per_node 2"),
        ("steps: 100", "steps: 2"),
        ("--nnodes 2", "--nnodes 1"),
        ("node0:29500", "127.0.0.1:{port}"),
    ],
}
NEEDS_SHARED = {"adapt.md", "nv-embed.md", "nomic-embed.md", "evaluation.md", "multi-gpu.md"}
PAGES = sorted(p.name for p in GUIDE.glob("*.md") if p.name != "README.md")


@dataclass
class Block:
    lang: str
    mark: str
    body: str
    line: int  # where the fence opens in the page


def blocks(text: str) -> list[Block]:
    return [
        Block(m["lang"], (m["mark"] or "").strip(), m["body"], text.count("\n", 0, m.start("lang")) + 1)
        for m in BLOCK.finditer(text)
    ]


def test_the_guide_has_its_pages_and_the_readme_links_it():
    expected = {
        "quickstart.md",
        "your-data.md",
        "adapt.md",
        "nv-embed.md",
        "nomic-embed.md",
        "evaluation.md",
        "serving.md",
        "multi-gpu.md",
        "troubleshooting.md",
    }
    assert expected <= set(PAGES)
    index = (GUIDE / "README.md").read_text()
    assert all(f"({page})" in index for page in PAGES), "docs/guide/README.md links every page"
    assert "docs/guide/" in (REPO / "README.md").read_text()
    assert not set(TINY) - set(PAGES), "TINY names a page that does not exist"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """{tiny_bert}: a saved 2 x 64 BERT embedder; {tiny_decoder}: a 2 x 64 Llama folder without a head."""
    from embforge.models.tiny import tiny_decoder

    backbone, tokenizer = tiny_decoder("llama", seed=0)
    folder = tmp_path_factory.mktemp("guide-models") / "tiny-llama"
    backbone.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"tiny_bert": str(tiny_model_dir), "tiny_decoder": str(folder)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the background command exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing listened on port {port} within {timeout:.0f} s")


def _check_output(expected: list[str], output: str, where: str) -> None:
    """Each expected line (``...`` = anything) occurs in ``output``, in order."""
    at = 0
    for line in expected:
        line = line.strip()
        if not line or line == "...":
            continue
        parts = [re.sub(r"(\\ )+", r"\\s+", re.escape(part.strip())) for part in line.split("...")]
        pattern = ".*?".join(p for p in parts if p)
        found = re.compile(pattern).search(output, at)
        assert found, f"{where}: expected output line not printed: {line!r}\n--- output ---\n{output[-4000:]}"
        at = found.end()


def _console_commands(body: str) -> list[tuple[str, list[str]]]:
    commands: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands and commands[-1][0].endswith("\\"):
            commands[-1] = (commands[-1][0][:-1] + " " + line.strip(), commands[-1][1])
        elif commands:
            commands[-1][1].append(line)
    return commands


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("page", PAGES)
def test_every_command_of_the_page_runs(page, tmp_path, models):
    if page in NEEDS_SHARED and not (SHARED / "data").is_dir():
        pytest.skip(f"docs/guide/{page} runs on ../shared/data, absent here (CI has it; a fresh clone does not)")
    text = (GUIDE / page).read_text()
    llm = None
    values = {**models, "port": _free_port()}
    if "{llm_url}" in "".join(new for _, new in TINY.get(page, [])):
        sys.path.insert(0, str(REPO / "tests" / "unit"))
        from fake_llm import FakeLLM

        llm = FakeLLM()
        values["llm_url"] = llm.url
    for old, new in TINY.get(page, []):
        assert old in text, f"docs/guide/{page} no longer says {old!r}: update TINY in {__file__}"
        text = text.replace(old, new.format(**values))

    work = tmp_path / "work"
    work.mkdir()
    for name in ("src", "tasks", "examples"):  # the documented paths are relative to the checkout
        (work / name).symlink_to(REPO / name)
    if (SHARED / "data").is_dir():
        (tmp_path / "shared").symlink_to(SHARED)  # ../shared from the working folder, as from the checkout
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TQDM_DISABLE": "1",
        "EMBFORGE_CACHE": str(tmp_path / "cache"),
    }
    background: list[subprocess.Popen] = []
    try:
        for block in blocks(text):
            where = f"docs/guide/{page}:{block.line}"
            if block.mark == "make":
                lines = [words for ln in block.body.splitlines() if (words := ln.split("#")[0].split())]
                assert all(ln[0] == "make" for ln in lines), f"{where}: a `make` block holds only make lines"
                assert {ln[1] for ln in lines} <= _make_targets(), f"{where}: a make target is not in the Makefile"
                continue
            if block.mark == "background":
                port = re.search(r"--port (\d+)", block.body)
                assert port, f"{where}: a background command names its --port"
                proc = subprocess.Popen(
                    ["bash", "-c", "exec " + block.body.strip()],
                    cwd=work,
                    env=env,
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                background.append(proc)
                _wait_for_port(int(port[1]), proc)
                continue
            if block.lang == "console":
                status = int(block.mark.split()[1]) if block.mark.startswith("exit") else 0
                for command, expected in _console_commands(block.body):
                    done = subprocess.run(
                        ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600
                    )
                    output = done.stdout + done.stderr
                    assert done.returncode == status, f"{where}: `{command}` exited {done.returncode}\n{output[-4000:]}"
                    _check_output(expected, output, f"{where}: `{command}`")
                continue
            argv = (
                [sys.executable, "-c", block.body]
                if block.lang == "python"
                else ["bash", "-euo", "pipefail", "-c", block.body]
            )
            done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
            output = done.stdout + done.stderr
            assert done.returncode == 0, (
                f"{where}: exited {done.returncode}\n{block.body}\n--- output ---\n{output[-6000:]}"
            )
    finally:
        for proc in background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        if llm is not None:
            llm.close()
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
