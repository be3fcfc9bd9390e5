"""Both ways a step writes host-read layers' staging ids into its block tables (row by row for a
few requests, one ragged tensor write for many) and both ways it takes the persistent tables (a
view of rows in order, a gather otherwise) give tokens identical to transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_engine_reference import (
    Job,
    assert_all_free,
    assert_matches,
    hf_generate,
    make_engine,
    prompt_of,
    run_engine,
)
from worker_svc.kv import step_access
from worker_svc.kv.table_buffer import BlockTableBuffer


@pytest.mark.parametrize("few_rows", [0, 100])
def test_staging_rows_written_either_way_match_transformers(hf_and_folder: tuple[Any, Path],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            few_rows: int) -> None:
    monkeypatch.setattr(step_access, "_FEW_ROWS", few_rows)
    model, folder = hf_and_folder
    engine = make_engine(folder, block_size=4, gpu_blocks=200, host_blocks=200, max_promotions_per_step=0)
    lengths, news, arrivals = [9, 5, 14, 7, 3], [6, 9, 4, 8, 7], [0, 0, 1, 2, 6]
    prompts = [prompt_of(n, 70 + i) for i, n in enumerate(lengths)]
    # Staggered arrivals and finishes: rows are reused out of order, so both table paths run.
    jobs = {f"r{i}": Job(prompts[i], news[i], arrive_step=arrivals[i], placement="GHHG" if i % 2 else "HGHG")
            for i in range(5)}
    seen: list[bool] = []
    rows_for = BlockTableBuffer.rows_for

    def recording(self: BlockTableBuffer, *args: Any) -> Any:
        out = rows_for(self, *args)
        seen.append(self.in_order)
        return out

    monkeypatch.setattr(BlockTableBuffer, "rows_for", recording)
    got = run_engine(engine, jobs)
    assert True in seen and False in seen  # both the view and the gather were used
    for i in range(5):
        assert_matches(got[f"r{i}"], hf_generate(model, prompts[i], news[i]))
    assert_all_free(engine)
