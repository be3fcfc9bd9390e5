"""Both ways a step builds host-read layers' block tables (every row host-read: the cached staging
table as is; some rows GPU-read: added to their own ids) and both ways it takes the persistent
tables (a view of rows in order, a gather otherwise) give tokens identical to transformers."""

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


@pytest.mark.parametrize("mixed", [False, True])
def test_staging_tables_built_either_way_match_transformers(hf_and_folder: tuple[Any, Path],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            mixed: bool) -> None:
    model, folder = hf_and_folder
    engine = make_engine(folder, block_size=4, gpu_blocks=200, host_blocks=200, max_promotions_per_step=0)
    lengths, news, arrivals = [9, 5, 14, 7, 3], [6, 9, 4, 8, 7], [0, 0, 1, 2, 6]
    prompts = [prompt_of(n, 70 + i) for i, n in enumerate(lengths)]
    # Staggered arrivals and finishes: rows are reused out of order, so both table paths run.
    # mixed: layers 0 and 1 have GPU-read rows beside host-read ones, layer 2 is host-read by all.
    jobs = {f"r{i}": Job(prompts[i], news[i], arrive_step=arrivals[i],
                         placement="GHHG" if i % 2 and mixed else "HGHG") for i in range(5)}
    seen: list[bool] = []
    rows_for = BlockTableBuffer.rows_for

    def recording(self: BlockTableBuffer, *args: Any) -> Any:
        out = rows_for(self, *args)
        seen.append(self.in_order)
        return out

    every_row: list[bool] = []  # per host-read layer built: all batch rows host-read?
    host_table = step_access.StepAccess._host_table

    def recording_table(self: step_access.StepAccess, layer: int, host: Any) -> Any:
        every_row.append(host.key == self._all_rows)
        return host_table(self, layer, host)

    monkeypatch.setattr(BlockTableBuffer, "rows_for", recording)
    monkeypatch.setattr(step_access.StepAccess, "_host_table", recording_table)
    got = run_engine(engine, jobs)
    assert True in seen and False in seen  # both the view and the gather were used
    assert set(every_row) == ({True, False} if mixed else {True})
    for i in range(5):
        assert_matches(got[f"r{i}"], hf_generate(model, prompts[i], news[i]))
    assert_all_free(engine)
