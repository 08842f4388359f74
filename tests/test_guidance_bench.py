"""The guidance cost benchmark runs end to end on tiny CPU configs and writes its JSON where told."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def test_bench_guidance_tiny_smoke_run(tmp_path, monkeypatch, committed_results_unchanged) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_guidance.py"
    spec = importlib.util.spec_from_file_location("bench_guidance", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_guidance", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--methods", "dense", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "guidance.json").read_text())
    assert {r["config"] for r in data["results"]} == {"tiny-wan", "tiny-flux"}
    for result in data["results"]:
        rows = result["rows"]
        assert set(rows) == {"dense: cfg only", "dense: guidance separate", "dense: guidance batched"}
        for key, row in rows.items():
            calls = row["attention_calls"]
            assert all((c["branch_calls"] > 0) == (key != "dense: cfg only") for c in calls.values())
        assert "ratio_vs_cfg_only" in rows["dense: guidance batched"]
    committed_results_unchanged()
