"""The engine's decode prefix (``Engine._schedule_decodes``: the leading decoding requests scheduled
by C-level passes, the rows at a block boundary grown together by ``grow_each_by_one`` when they
all fit, else ``make_room`` for each) gives the same steps and block ids as the general
scheduling loop alone, after random mixes of admission, growth, finish, abort and preemption (both
modes, a GPU tier too small for the batch)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from common.types import Placement, SamplingParams
from worker_svc.engine import Engine, EngineConfig
from worker_svc.outputs import StepOutput


def make(mode: str, placement: str) -> Engine:
    config = EngineConfig(model="tiny-llama", block_size=4, gpu_blocks=160, host_blocks=400,
                          staging_blocks=160,
                          max_num_seqs=8, max_num_batched_tokens=64, max_prefill_tokens=48,
                          preemption_mode=mode, max_promotions_per_step=1, default_placement=placement)
    return Engine.from_config(config)


def summary(engine: Engine, out: StepOutput) -> tuple[Any, ...]:
    """Everything a step reports but its timings, and every table's block ids after it."""
    s = out.stats
    blocks = tuple((rid, t.blocks_per_layer, tuple((lb.home, tuple(lb.gpu_blocks), tuple(lb.host_blocks))
                                                   for lb in t.layers))
                   for rid, t in sorted(engine.kv_manager.tables.items()))
    return (tuple((o.request_id, o.new_token_ids, o.finished, o.finish_reason, o.error, o.placement,
                   o.bytes_offloaded, o.bytes_loaded) for o in out.outputs),
            out.admitted, tuple((r.request_id, r.tokens_generated, r.context_tokens, r.placement)
                                for r in out.running),
            (s.kind, s.num_tokens, s.num_prefill_tokens, s.num_decode_requests, s.num_preemptions,
             s.num_swapped_layers, s.bytes_offloaded, s.bytes_loaded),
            out.preempted, out.waiting, out.usage, blocks)


def drive(engine: Engine, seed: int) -> list[tuple[Any, ...]]:
    """A random workload: arrivals over time, stop ids, sampled and greedy rows, aborts."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    layers = engine.geometry.num_layers
    steps = []
    next_id = 0
    for step in range(70):
        for _ in range(rng.choice((0, 0, 0, 1, 2)) if step < 45 else 0):
            sampling = SamplingParams(max_tokens=rng.randint(4, 30), temperature=rng.choice((0.0, 0.8)),
                                      seed=rng.choice((None, 7)), stop_token_ids=(rng.randrange(vocab),),
                                      ignore_eos=rng.random() < 0.5)
            letters = "".join(rng.choice("GH") for _ in range(layers))
            placement = Placement.from_letters(letters, layers) if rng.random() < 0.5 else None
            engine.add_request(f"q{next_id}", [rng.randrange(1, vocab) for _ in range(rng.randint(3, 40))],
                               sampling, placement, rng.choice(("", "recompute", "swap-layers")))
            next_id += 1
        if rng.random() < 0.05 and engine._requests:
            engine.abort(rng.choice(sorted(engine._requests)))
        steps.append(summary(engine, engine.step()))
    return steps


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("mode,placement", [("recompute", "all-gpu"), ("swap-layers", "auto")])
def test_decode_prefix_matches_the_general_loop(monkeypatch: pytest.MonkeyPatch, seed: int, mode: str,
                                                placement: str) -> None:
    fast = make(mode, placement)
    taken: list[int] = []
    original = Engine._schedule_decodes

    def counted(self: Engine, *args: Any) -> int:
        i = original(self, *args)
        taken.append(i)
        return i

    monkeypatch.setattr(Engine, "_schedule_decodes", counted)
    got = drive(fast, seed)
    monkeypatch.setattr(Engine, "_schedule_decodes", lambda self, *args: 0)  # the general loop only
    want = drive(make(mode, placement), seed)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"step {i + 1} differs"
    # The prefix did the work: it scheduled decodes, and stopped or handed over at a preemption.
    assert sum(i > 0 for i in taken) > 20
    assert sum(s[3][4] for s in got) > 0, "no preemption: the test is too loose"


@pytest.mark.parametrize("seed", range(4))
def test_grow_each_by_one_takes_what_one_growth_each_takes(seed: int) -> None:
    """Tables of random placements (a tight host tier and staging rule, so some batches do not fit)
    grown together and one by one by ``_grow_one``: the same ids, counts and staging demand; and a
    batch that does not fit takes nothing."""
    from common.types import KVGeometry
    from worker_svc.kv.manager import KVCacheManager

    rng = random.Random(seed)
    layers = 6
    geo = KVGeometry(layers, 1, 2, 4, 4)

    def manager() -> KVCacheManager:
        mgr = KVCacheManager(geo, gpu_blocks=200, host_blocks=150, staging_blocks=60)
        r = random.Random(seed)
        for i in range(10):
            letters = "".join(r.choice("GGH") for _ in range(layers))
            mgr.allocate(f"t{i}", r.randint(1, 14), Placement.from_letters(letters, layers))
        return mgr

    def state(mgr: KVCacheManager) -> tuple[Any, ...]:
        tables = tuple((t.blocks_per_layer,
                        tuple((tuple(lb.gpu_blocks), tuple(lb.host_blocks)) for lb in t.layers))
                       for t in mgr.tables.values())
        return (mgr.gpu.num_free, mgr.host.num_free, tuple(mgr._host_read),
                tuple(map(tuple, mgr._used.values())), tables)

    together, alone = manager(), manager()
    outcomes = []
    for _ in range(12):
        ids = rng.sample(sorted(together.tables), rng.randint(2, 6))
        ids.sort(key=list(together.tables).index)  # in admission order, as the engine asks
        before = state(together)
        grew = together.grow_each_by_one([together.tables[i] for i in ids])
        outcomes.append(grew)
        if grew:
            for i in ids:
                assert alone._grow_one(alone.tables[i])
        else:
            assert state(together) == before  # nothing taken
            for i in ids:  # what the caller does then: one by one (some may not fit)
                if together._grow_one(together.tables[i]):
                    assert alone._grow_one(alone.tables[i])
        assert state(together) == state(alone)
    assert True in outcomes and False in outcomes, outcomes
