"""The predict memory benchmark runs end to end on a small file (its real figures: a million rows, by hand)."""

import pytest

from benchmarks.predict_memory import format_table, measure


@pytest.mark.slow
def test_both_ways_read_every_row_and_streaming_holds_less(tmp_path):
    result = measure(rows=30_000, chunk=256, folder=tmp_path)
    assert result["rows"] == 30_000 and result["file_bytes"] == (tmp_path / "reviews.csv").stat().st_size
    assert set(result["ways"]) == {"stream", "whole"}
    for way in result["ways"].values():
        assert way["rows"] == 30_000 and way["peak_bytes"] >= 0 and way["seconds"] >= 0
    # The whole read holds the frame and a dict per row; the stream one chunk (not a timed or tight bound).
    assert result["ways"]["stream"]["peak_bytes"] < result["ways"]["whole"]["peak_bytes"]
    assert result["stream_over_whole"] < 1
    assert "stream / whole" in format_table(result)
