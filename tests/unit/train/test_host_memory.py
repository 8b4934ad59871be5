"""CPU training keeps freed host memory mapped (glibc): big blocks come from the heap, not fresh mmaps."""

import ctypes
import subprocess
import sys

import pytest
import torch

import embforge.train.host_memory as host_memory
import embforge.train.trainer as trainer
from embforge.train.host_memory import keep_freed_memory

from .helpers import stage_config, tiny_embedder, train_on
from .test_mlm import corpus, recipe, train_mlm  # noqa: F401 (corpus is a fixture)

LIBC = host_memory.glibc()
pytestmark = pytest.mark.skipif(
    LIBC is None or not hasattr(LIBC, "mallinfo2"), reason="keep_freed_memory acts on glibc's malloc (>= 2.33 here)"
)


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


if LIBC is not None and hasattr(LIBC, "mallinfo2"):
    LIBC.mallinfo2.restype = MallInfo2


def mallinfo() -> MallInfo2:
    return LIBC.mallinfo2()


def new_mmaps_for_a_big_block() -> int:
    """mmapped blocks added by one allocation too big for the heap's free space and for any mmap threshold."""
    size = max(64 * 2**20, mallinfo().fordblks + 2**20)  # bytes: nothing free in the heap can serve it
    before = mallinfo().hblks
    block = torch.empty(size // 4)  # torch's CPU allocator: posix_memalign, i.e. glibc malloc; pages untouched
    held = mallinfo().hblks
    del block
    return held - before


@pytest.fixture(autouse=True)
def no_user_malloc_settings(monkeypatch):
    for name in host_memory.USER_MALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)


def test_big_blocks_come_from_the_heap_inside_and_from_mmap_again_after():
    assert new_mmaps_for_a_big_block() == 1
    with keep_freed_memory() as active:
        assert active
        assert new_mmaps_for_a_big_block() == 0
    assert new_mmaps_for_a_big_block() == 1  # mmap is back


def test_nested_blocks_restore_at_the_outermost_exit_only():
    with keep_freed_memory():
        with keep_freed_memory():
            assert new_mmaps_for_a_big_block() == 0
        assert new_mmaps_for_a_big_block() == 0  # the outer loop still runs
    assert new_mmaps_for_a_big_block() == 1


def test_an_exception_inside_restores_too():
    with pytest.raises(KeyboardInterrupt), keep_freed_memory():
        raise KeyboardInterrupt
    assert host_memory._depth == 0
    assert new_mmaps_for_a_big_block() == 1


def test_disabled_not_glibc_or_user_tuned_changes_nothing(monkeypatch):
    with keep_freed_memory(enabled=False) as active:
        assert not active
        assert new_mmaps_for_a_big_block() == 1
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=10")
    with keep_freed_memory() as active:
        assert not active
        assert new_mmaps_for_a_big_block() == 1
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    with keep_freed_memory() as active:
        assert not active
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setattr(host_memory, "glibc", lambda: None)
    with keep_freed_memory() as active:
        assert not active
        assert new_mmaps_for_a_big_block() == 1


def test_leaving_returns_the_retained_memory_to_the_system():
    code = (
        "import resource, torch\n"
        "from embforge.train.host_memory import keep_freed_memory\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() // 2**20\n"
        "base = rss()\n"
        "with keep_freed_memory():\n"
        "    for _ in range(3):\n"
        "        t = torch.ones(64 * 2**20); del t\n"  # 256 MiB, written, freed: retained inside the block
        "    inside = rss()\n"
        "print(inside - base, rss() - base)\n"
    )
    # the child inherits the environment no_user_malloc_settings cleared
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    inside, after = map(int, out.stdout.split())
    assert inside >= 200  # freed, but kept mapped for reuse
    assert after < 50  # malloc_trim gave it back


def _spy(monkeypatch, module) -> list:
    entered, real = [], module.keep_freed_memory

    def spy(enabled=True):
        entered.append(enabled)
        return real(enabled)

    monkeypatch.setattr(module, "keep_freed_memory", spy)
    return entered


def test_cpu_training_loops_keep_freed_memory(data_dir, corpus, tmp_path, monkeypatch):  # noqa: F811
    entered = _spy(monkeypatch, trainer)  # the one loop both objectives run in
    train_on(data_dir, tmp_path / "run", tiny_embedder(), stage_config(steps=2, save_every=0))
    assert entered == [True]
    train_mlm(recipe(corpus, tmp_path / "mlm", steps=2, eval_every=0), corpus)
    assert entered == [True, True]
    assert host_memory._depth == 0 and new_mmaps_for_a_big_block() == 1  # both left it afterwards
