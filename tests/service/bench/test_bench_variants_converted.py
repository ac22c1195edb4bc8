"""`kvserve bench variants` with a converted row (`NAME=DIR` from `kvserve convert`): its perplexity
is the directory's own, the mean-pooled row beside it is computed as before, and the report states
the training budget recorded in the directory; the plot still renders (serving skipped here)."""
from __future__ import annotations

import re

import pytest

import model.convert.run as convert_run
from model.loader import load_model
from service.bench import cli
from service.bench.variants import perplexity, text_ids
from tests.model.test_convert import SMALL_TEXT, tiny_opts


def test_converted_row_has_its_own_perplexity_and_budget(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(convert_run, "stdlib_docstrings", lambda: SMALL_TEXT)
    record = convert_run.convert(tiny_opts(tmp_path / "distilled", steps=3), log=lambda line: None)
    out = tmp_path / "report"
    rc = cli.main(["variants", "--model", "tiny", "--variants", f"gqa-2,mqa,mqa-distilled={tmp_path / 'distilled'}",
                   "--dtype", "float32", "--ppl-tokens", "100", "--ppl-window", "64", "--concurrency", "",
                   "--out", str(out)])
    assert rc == 0
    md = (out / "variants.md").read_text()
    assert (out / "variants.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {cells[0].split()[0]: cells for line in md.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert rows["mqa-distilled"][1:3] == ["1", rows["mqa"][2]]  # MQA's footprint
    distilled, tokenizer = load_model(tmp_path / "distilled", progress=False)
    expected = perplexity(distilled, text_ids(tokenizer, 101), 64, 32)
    assert float(rows["mqa-distilled"][5]) == pytest.approx(expected, abs=1e-3)
    assert float(rows["mqa-distilled"][5]) != float(rows["mqa"][5])
    line = next(line for line in md.splitlines() if line.startswith("- **mqa-distilled**"))
    assert f"against {float(rows['mqa'][5]):.3f} mean-pooled" in line
    assert re.search(r"`--init fit` \(256 calibration tokens\), distilled 3 steps = 192 tokens", line), line
    assert record["budget"]["tokens"] == 192
