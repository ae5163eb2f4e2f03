"""Text sources: local .txt/.jsonl/.parquet and `datasets` (on local files), fractions, windows, errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import sample_text

from llmslim.data import DataHub, read_text, windows
from llmslim.errors import UserError
from llmslim.recipe import DataSource


def test_txt_fractions_are_disjoint_and_cover_the_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(sample_text(600))
    whole = read_text(DataSource(path=str(f)), "x")
    first = read_text(DataSource(path=str(f), fraction=(0.0, 0.5)), "x")
    second = read_text(DataSource(path=str(f), fraction=(0.5, 1.0)), "x")
    assert whole == f.read_text() and first + second == whole
    assert first.endswith("\n") and 0.45 < len(first) / len(whole) < 0.55


def test_jsonl_parquet_and_datasets_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"story number {i}." for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    pq.write_table(pa.table({"text": rows}), tmp_path / "d.parquet")
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    pq.write_table(pa.table({"text": rows}), ds_dir / "train.parquet")
    expected = "\n\n".join(rows[2:8])
    for src in (DataSource(path=str(tmp_path / "d.jsonl"), fraction=(0.2, 0.8)),
                DataSource(path=str(tmp_path / "d.parquet"), fraction=(0.2, 0.8)),
                DataSource(dataset=str(ds_dir), split="train", fraction=(0.2, 0.8))):
        assert read_text(src, "x") == expected


BAD = [
    ("missing file", lambda p: DataSource(path=str(p / "nope.txt")), r"data.x.path: file not found: .*nope.txt"),
    ("unsupported type", lambda p: DataSource(path=str(_write(p / "a.csv", "a,b"))),
     r"unsupported file type '.csv'.*expected .txt, .jsonl or .parquet"),
    ("bad json line", lambda p: DataSource(path=str(_write(p / "a.jsonl", '{"text": "a"}\n{oops\n'))),
     r"a.jsonl:2: not valid JSON"),
    ("missing json field", lambda p: DataSource(path=str(_write(p / "b.jsonl", '{"body": "a"}\n'))),
     r"b.jsonl:1: no field 'text' \(data.x.field\); found: body"),
    ("unknown dataset", lambda p: DataSource(dataset=str(p / "no_such_dataset")), r"data.x: cannot load dataset"),
]


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("what,make,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_sources_give_clear_errors(tmp_path, what, make, pattern):
    with pytest.raises(UserError, match=pattern):
        read_text(make(tmp_path), "x")


def test_windows_are_non_overlapping_and_seeded():
    stream = torch.arange(1000)
    w = windows(stream, 64, None, seed=None, name="x")
    assert w.shape == (15, 64) and torch.equal(w.flatten(), stream[: 15 * 64])
    a = windows(stream, 64, 5, seed=0, name="x")
    assert torch.equal(a, windows(stream, 64, 5, seed=0, name="x"))
    assert not torch.equal(a, windows(stream, 64, 5, seed=1, name="x"))
    assert torch.equal(windows(stream, 64, 5, seed=None, name="x"), w[:5])
    with pytest.raises(UserError, match=r"data.x: needs 20 window\(s\) of 64 tokens but the text has only 1000 tokens"):
        windows(stream, 64, 20, seed=0, name="x")


def test_datahub_needs_a_tokenizer(tmp_path):
    f = _write(tmp_path / "a.txt", "hello")
    with pytest.raises(UserError, match="no tokenizer files"):
        DataHub({"x": DataSource(path=str(f))}, None, seed=0).calibration("x")
