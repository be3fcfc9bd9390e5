"""The in-place CPU decode kernel gives what the SDPA backend's gather-then-attend path gives:
grouped and plain heads, ragged contexts over scattered blocks, strided queries and tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker_svc import native, paged_decode
from worker_svc.attention import AttentionBackend, AttentionMetadata, select_backend

pytestmark = pytest.mark.skipif(paged_decode.load() is None, reason="no C compiler to build the kernel")


def _meta(table: torch.Tensor, lens: list[int]) -> AttentionMetadata:
    empty = torch.zeros(len(lens), dtype=torch.int64)
    return AttentionMetadata(is_prefill=False, slot_blocks=empty, slot_offsets=empty,
                             seq_lens=[1] * len(lens), block_table=table,
                             context_lens=torch.tensor(lens, dtype=torch.int32),
                             max_context=max(lens), context_list=lens)


@pytest.mark.parametrize(("heads", "kv_heads", "block_size", "d"),
                         [(9, 3, 16, 64), (4, 4, 1, 64), (8, 1, 5, 128), (6, 2, 4, 32),
                          (4, 2, 32, 64), (8, 2, 24, 128)])
def test_kernel_matches_the_gather_path(heads: int, kv_heads: int, block_size: int, d: int) -> None:
    torch.manual_seed(0)
    lens = [1, 37, 160, 16, 81]
    blocks = [-(-n // block_size) for n in lens]
    m = max(blocks)
    cache = torch.randn(sum(blocks) + 7, 2, block_size, kv_heads, d)
    ids = torch.randperm(cache.shape[0])  # each row's blocks scattered over the cache
    wide = torch.zeros(len(lens), m + 3, dtype=torch.int32)  # a view of a wider buffer: strided rows
    used = 0
    for row, n in enumerate(blocks):
        wide[row, :n] = ids[used:used + n].to(torch.int32)
        used += n
    table = wide[:, :m]
    qkv = torch.randn(len(lens), heads + 2 * kv_heads, d)  # q is a slice of it, as in the forward
    q = qkv[:, :heads]
    want = AttentionBackend().decode(q, cache, _meta(table, lens))
    native = AttentionBackend(native_decode=True)
    got = native.decode(q, cache, _meta(table, lens))
    assert native._work is None  # no gather workspace was needed
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_auto_uses_the_kernel_on_cpu_float32_only() -> None:
    assert select_backend(torch.device("cpu"), torch.float32)._native is not None
    assert select_backend(torch.device("cpu"), torch.bfloat16)._native is None
    assert select_backend(torch.device("cpu"), torch.float32, "sdpa")._native is None


def test_the_built_library_is_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first build lands in the cache folder; a later process loads it without compiling."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert paged_decode.KERNEL.build() is not None
    built = list((tmp_path / "layerkv" / "paged-decode").glob("paged_decode-*.so"))
    assert len(built) == 1

    def no_compiler(name: str, source: str, cc: str, folder: str) -> str:
        raise AssertionError("compiled again")

    monkeypatch.setattr(native, "_compile", no_compiler)
    assert paged_decode.KERNEL.build() is not None


@pytest.mark.parametrize("spread", [0.01, 30.0])
def test_peaked_and_flat_softmax_match_across_blocks(spread: float) -> None:
    """The one-pass kernel rescales each head's running sum when a later block holds a larger
    score: near-one-hot weights (large scores, the maximum in the last block) and near-uniform ones
    (exp of scores near 0) both give the gather path's result."""
    torch.manual_seed(1)
    heads, kv_heads, block_size, d = 4, 2, 4, 64
    lens = [3, 45, 64]
    blocks = [-(-n // block_size) for n in lens]
    cache = torch.randn(sum(blocks), 2, block_size, kv_heads, d)
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    used = 0
    for row, n in enumerate(blocks):
        table[row, :n] = torch.arange(used, used + n, dtype=torch.int32)
        used += n
    # each row's last key equals its query's direction: the largest score is in the last block
    q = torch.randn(len(lens), heads, d) * spread
    for row, n in enumerate(lens):
        last = table[row, (n - 1) // block_size]
        first_of_each_group = q[row].view(kv_heads, heads // kv_heads, d)[:, 0]
        cache[last, 0, (n - 1) % block_size] = first_of_each_group / max(spread, 1.0)
    want = AttentionBackend().decode(q, cache, _meta(table, lens))
    got = AttentionBackend(native_decode=True).decode(q, cache, _meta(table, lens))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (Linux's smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return []


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.skipif(_thp_mode() == "never", reason="no transparent huge pages on this machine")
@pytest.mark.parametrize("in_place", [True, False])
def test_the_cpu_kv_pool_is_advised_onto_huge_pages(in_place: bool) -> None:
    """The pool the decode kernel reads in place is madvise(MADV_HUGEPAGE)d ('hg' in its mapping's
    flags) before it is zeroed, and still reads as zeros."""
    from common.types import KVGeometry
    from worker_svc.kv.kv_cache import KVCache

    geo = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype_bytes=4)
    kv = KVCache(geo, 512, 0, 256, torch.device("cpu"), torch.float32, host_in_place=in_place)
    pool = kv.compute
    assert pool.numel() * pool.element_size() >= 8 << 20
    middle = pool.data_ptr() + pool.numel() * pool.element_size() // 2
    assert "hg" in _vm_flags(middle)
    assert not pool.any()
