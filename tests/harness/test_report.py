"""Reports: JSON schema, the markdown table and its random-weights first line, the Pareto plot, sweeps."""

from __future__ import annotations

import json
import random

import matplotlib
import matplotlib.pyplot as plt
import pytest
from report_records import ENV, three_strategies

from encoder_fusion.benchmarks.reports.aggregate import aggregate
from encoder_fusion.benchmarks.reports.figures import pareto_figure
from encoder_fusion.benchmarks.reports.records import SCHEMA_VERSION, VlmRecord
from encoder_fusion.benchmarks.reports.render import render_markdown
from encoder_fusion.benchmarks.reports.report import build_report, environment, load_report, write_report
from encoder_fusion.benchmarks.run.compare import job_overrides
from encoder_fusion.io import atomic_write, write_json


def test_build_report_fills_deltas_and_flags_random_weights():
    report = build_report(three_strategies(), run={"seed": 0}, env=ENV)
    assert report.schema_version == SCHEMA_VERSION == 2
    assert report.weights_random is True and report.random_encoders == ["clip", "dino"]
    assert report.tasks == ["classification"]
    deltas = {s.name: s.accuracy["classification"].delta for s in report.strategies}
    assert deltas == pytest.approx({"clip_only": 0.0, "dino_only": -0.125, "comm": 0.075})
    pretrained = build_report(three_strategies("pretrained"), env=ENV)
    assert pretrained.weights_random is False and pretrained.random_encoders == []
    with pytest.raises(ValueError, match=r"distinct names; repeated: \['comm'\]"):
        build_report([*three_strategies(), three_strategies()[2]], env=ENV)


def test_markdown_first_line_table_and_errors():
    text = render_markdown(build_report(three_strategies(), env=ENV))
    lines = text.splitlines()
    assert lines[0].startswith("**RANDOM WEIGHTS: encoder(s) clip, dino ran on random weights")
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 3  # header, rule, one row per strategy
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:5] == ["strategy", "encoders", "weights", "classification top1 (%)", "Δ vs CLIP [95 % CI]"]
    comm = dict(zip(header, [c.strip() for c in table[4].strip("|").split("|")]))
    assert comm["strategy"] == "**comm**"
    assert comm["classification top1 (%)"] == "70.0 ± 0.0"
    assert comm["Δ vs CLIP [95 % CI]"] == "+7.5 pp"  # no item statistics here, so no interval
    assert comm["vision ms"] == "57.20 (51.48–68.64)"
    assert comm["overhead"] == "1.43x"
    assert comm["peak mem MB"] == "812" and comm["visual tokens"] == "196"
    assert "TTFT ms" not in header and "vision overhead" not in header  # no language model: one ratio
    assert "Language model: none (llm=none)" in text
    assert comm["params trainable / total"] == "1.25M / 93.00M"
    dino = dict(zip(header, [c.strip() for c in table[3].strip("|").split("|")]))
    assert dino["classification top1 (%)"] == "50.0 ± 5.0" and dino["Δ vs CLIP [95 % CI]"] == "-12.5 pp"
    assert "- comm / probe:dense: ValueError: no masks" in lines
    pretrained = render_markdown(build_report(three_strategies("pretrained"), env=ENV))
    assert pretrained.splitlines()[0] == "# encoder-fusion benchmark"
    assert "RANDOM" not in pretrained


def with_vlm(records, ttft, tokens, projected_ttft):
    """``records`` with a language-model stage: hand-chosen TTFT medians, visual tokens and projected
    TTFTs (the baseline first); ratios as measure_latency computes them."""
    for record, median, count, projected in zip(records, ttft, tokens, projected_ttft):
        record.tokens = count
        record.vlm = VlmRecord(
            llm="qwen2_5_0_5b",
            hidden_size=896,
            visual_tokens=count,
            prompt_tokens=32,
            decode_tokens=16,
            prefill={"median": median - 50.0, "p10": median - 60.0, "p90": median - 40.0, "n": 5},
            ttft={"median": median, "p10": median * 0.9, "p90": median * 1.1, "n": 5},
            decode_tokens_per_s={"median": 20.0 - count / 100, "p10": 18.0, "p90": 21.0, "n": 5},
            prefill_gflops=count * 0.9,
            llm_share=(median - 50.0) / median,
            ratios={"ttft": median / ttft[0], "vision": record.ratios.end_to_end},
            projected={
                "qwen2_5_7b": {
                    "ttft_ms": projected,
                    "ratio": projected / projected_ttft[0],
                    "projected": True,
                }
            },
        )
    return records


def labelled_points(axis) -> dict:
    """label -> (x, y) of every point a figure's axis draws under a label (not ``_``-hidden)."""
    return {
        c.get_label(): tuple(c.get_offsets()[0])
        for c in axis.collections
        if not c.get_label().startswith("_")
    }


def test_markdown_and_pareto_lead_with_the_time_to_first_token():
    records = with_vlm(
        three_strategies(),
        ttft=[1000.0, 1100.0, 1580.0],
        tokens=[196, 256, 392],
        projected_ttft=[5000.0, 6000.0, 9500.0],
    )
    report = build_report(records, env=ENV)
    text = render_markdown(report)
    lines = text.splitlines()
    assert lines[0].startswith("**RANDOM WEIGHTS")
    assert (
        lines[4].startswith("Language model: qwen2_5_0_5b (random weights") and "32 prompt tokens" in lines[4]
    )
    assert "Projected (not measured): the overhead with qwen2_5_7b" in text
    table = [line for line in lines if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    comm = dict(zip(header, [c.strip() for c in table[4].strip("|").split("|")]))
    assert comm["visual tokens"] == "392"
    assert comm["TTFT ms"] == "1580.00 (1422.00–1738.00)"
    assert comm["overhead"] == "1.58x" and comm["vision overhead"] == "1.43x"
    assert comm["LLM share of TTFT"] == "97 %" and comm["decode tok/s"] == "16.1"
    assert comm["overhead with qwen2_5_7b (projected)"] == "1.90x"
    assert comm["vision ms"] == "57.20 (51.48–68.64)"
    assert report.llms == ["qwen2_5_0_5b"]
    figure = pareto_figure(report)
    (axis,) = figure.axes
    filled = labelled_points(axis)
    assert filled["comm"] == pytest.approx((1.58, 7.5)) and filled["dino_only"] == pytest.approx((1.1, -12.5))
    hollow = sorted(tuple(c.get_offsets()[0]) for c in axis.collections if c.get_label().startswith("_"))
    for point, expected in zip(hollow, [(0.5, -12.5), (1.0, 0.0), (1.43, 7.5)], strict=True):
        assert point == pytest.approx(expected)  # the vision-only overheads
    assert "time-to-first-token overhead" in axis.get_xlabel()


def test_pareto_points_are_the_strategies():
    report = build_report(three_strategies(), env=ENV)
    figure = pareto_figure(report)
    (axis,) = figure.axes
    points = labelled_points(axis)
    expected = {"clip_only": (1.0, 0.0), "dino_only": (0.5, -12.5), "comm": (1.43, 7.5)}
    assert set(points) == set(expected)
    for name, point in expected.items():
        assert points[name] == pytest.approx(point)
    assert sorted(t.get_text() for t in axis.texts) == ["clip_only", "comm", "dino_only"]
    assert figure.texts[0].get_text().startswith("RANDOM WEIGHTS")


def test_writing_a_report_leaves_matplotlib_and_pyplot_as_they_were(tmp_path, monkeypatch):
    """A notebook that writes a report (``aggregate``) keeps its backend and its open figures."""
    original = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend other than Agg, so a switch to Agg would show
    try:
        mine = plt.figure()
        before = plt.get_fignums()

        def no_switch(*args, **kwargs):
            raise AssertionError(f"matplotlib.use{args} called while writing a report")

        monkeypatch.setattr(matplotlib, "use", no_switch)
        monkeypatch.setattr(plt, "switch_backend", no_switch)
        write_report(build_report(three_strategies(), env=ENV), tmp_path)
        monkeypatch.undo()
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == before and plt.gcf() is mine  # no pyplot figure made or closed
        assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.close("all")
        matplotlib.use(original)


def test_report_json_carries_layer_weights_of_weighted_ln_strategies(tmp_path):
    """run_probe's layer weights, in a record as run.py stores it, reach report.json unchanged, and
    an aggregated sweep keeps them."""
    generator = random.Random(11)
    strategies = three_strategies()
    learned = {}
    for record_, layers in zip(strategies, ({"clip": 3}, {"dino": 2}, {"clip": 3, "dino": 4})):
        per_seed = {}
        for encoder, count in layers.items():
            seeds = []
            for _ in range(2):
                raw = [generator.random() for _ in range(count)]
                seeds.append([value / sum(raw) for value in raw])
            per_seed[encoder] = seeds
        mean = {e: [(a + b) / 2 for a, b in zip(*seeds)] for e, seeds in per_seed.items()}
        record_.accuracy["classification"].extra = {
            "layer_weights": mean,
            "layer_weights_per_seed": per_seed,
        }
        learned[record_.name] = mean
    path = write_report(build_report(strategies, env=ENV), tmp_path / "sweep" / "0")
    for saved in load_report(path).strategies:
        assert saved.accuracy["classification"].extra["layer_weights"] == learned[saved.name]
    merged = load_report(aggregate(tmp_path / "sweep"))  # the fused row is named "comm [0]" there
    assert {
        s.name.partition(" [")[0]: s.accuracy["classification"].extra["layer_weights"]
        for s in merged.strategies
    } == learned


def test_write_report_is_complete_and_leaves_no_temporaries(tmp_path):
    report = build_report(three_strategies(), run={"seed": 3}, env=ENV)
    path = write_report(report, tmp_path / "run")
    assert path == tmp_path / "run" / "report.json"
    assert load_report(path) == report
    assert json.loads(path.read_text()) == json.loads(json.dumps(report.to_dict()))
    assert (tmp_path / "run" / "report.md").read_text().startswith("**RANDOM WEIGHTS")
    png = (tmp_path / "run" / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["pareto.png", "report.json", "report.md"]


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "deep" / "x.json"
    for _ in range(3):
        payload = {"values": [random.random() for _ in range(100)]}
        write_json(target, payload)
        assert json.loads(target.read_text()) == payload
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_load_report_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no report at"):
        load_report(tmp_path / "missing.json")
    (tmp_path / "old.json").write_text(json.dumps({"schema_version": 0}))
    with pytest.raises(ValueError, match=r"schema_version=0; accepted: 2$"):
        load_report(tmp_path / "old.json")
    (tmp_path / "v1.json").write_text(json.dumps({"schema_version": 1, "strategies": []}))
    with pytest.raises(
        ValueError,
        match=r"schema_version=1; accepted: 2; version 1 reports predate the "
        r"language-model \(TTFT\) stage: rerun the benchmark",
    ):
        load_report(tmp_path / "v1.json")
    data = build_report(three_strategies(), env=ENV).to_dict()
    data["strategies"][1]["overhaed"] = 2.0
    (tmp_path / "typo.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"strategy 'dino_only' has unknown fields \['overhaed'\]"):
        load_report(tmp_path / "typo.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_report(tmp_path / "bad.json")


def sweep_job(sweep, number, fused_name, overrides, hooks="penultimate"):
    strategies = three_strategies()
    strategies[2].name = fused_name
    for s in strategies[:2]:
        s.config = {"key": f"{s.name}-{hooks}"}
    report = build_report(strategies, run={"overrides": overrides}, env=ENV)
    write_report(report, sweep / str(number))


def test_aggregate_lists_every_job_and_every_failure(tmp_path):
    sweep = tmp_path / "multirun"
    sweep_job(sweep, 0, "comm", ["experiment=smoke", "fusion=comm", "hooks=penultimate"])
    sweep_job(sweep, 1, "prismatic", ["experiment=smoke", "fusion=prismatic", "hooks=penultimate"])
    sweep_job(sweep, 2, "comm", ["experiment=smoke", "fusion=comm", "hooks=last3"], hooks="last3")
    write_json(sweep / "3" / "error.json", {"error": "ValueError: align.grid=[5, 5] does not divide 14"})
    (sweep / "4" / ".hydra").mkdir(parents=True)  # a job that died before writing anything
    path = aggregate(sweep)
    report = load_report(path)
    names = [s.name for s in report.strategies]
    # baselines once per distinct configuration, labelled since clip_only has two; fused rows named by
    # the overrides that set their job apart (experiment=smoke is shared by all, so left out)
    assert names == [
        "clip_only [fusion=comm,hooks=penultimate]",
        "dino_only [fusion=comm,hooks=penultimate]",
        "comm [fusion=comm,hooks=penultimate]",
        "prismatic [fusion=prismatic,hooks=penultimate]",
        "clip_only [fusion=comm,hooks=last3]",
        "dino_only [fusion=comm,hooks=last3]",
        "comm [fusion=comm,hooks=last3]",
    ]
    assert [j["label"] for j in report.jobs] == [
        "fusion=comm,hooks=penultimate",
        "fusion=prismatic,hooks=penultimate",
        "fusion=comm,hooks=last3",
    ]
    fused = [s for s in report.strategies if s.role == "fused"]
    assert len(fused) == 3 and all(s.accuracy["classification"].delta == pytest.approx(0.075) for s in fused)
    assert [j["job"] for j in report.failed_jobs] == ["3", "4"]
    assert "does not divide 14" in report.failed_jobs[0]["error"]
    assert "the job died, was cancelled or is still running" in report.failed_jobs[1]["error"]
    text = (sweep / "report.md").read_text()
    assert text.startswith("**RANDOM WEIGHTS")
    assert "- job 3: ValueError: align.grid=[5, 5] does not divide 14" in text
    assert (sweep / "pareto.png").is_file()


def test_aggregate_keeps_one_plain_baseline_when_all_jobs_share_it(tmp_path):
    sweep = tmp_path / "sweep"
    for number, fused in enumerate(("comm", "eagle", "mmvp_interleave")):
        sweep_job(sweep, number, fused, ["experiment=smoke", f"fusion={fused}"])
    report = load_report(aggregate(sweep, tmp_path / "out"))
    assert [s.name for s in report.strategies] == [
        "clip_only",
        "dino_only",
        "comm [fusion=comm]",
        "eagle [fusion=eagle]",
        "mmvp_interleave [fusion=mmvp_interleave]",
    ]
    assert report.failed_jobs == [] and (tmp_path / "out" / "report.md").is_file()


def test_aggregate_rejects_a_folder_without_jobs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        aggregate(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds no job folder"):
        aggregate(tmp_path)


def test_environment_names_device_and_command():
    env = environment("cpu", command="fusion-bench experiment=smoke")
    assert env["command"] == "fusion-bench experiment=smoke" and env["device_type"] == "cpu"
    assert "cores" in env["device"] and env["torch"]
    assert job_overrides() == []  # outside Hydra


def test_no_text_of_the_pareto_figure_is_cut_off(tmp_path):
    """A long title and a long label beside the rightmost point stick out of the panels; the saved
    picture still holds every piece of text."""
    from PIL import Image

    from encoder_fusion.benchmarks.reports.figures import plot_pareto

    records = three_strategies()
    records[2].name = "comm [" + ",".join(f"option_{i}=value_{i}" for i in range(8)) + "]"
    report = build_report(records, env=ENV)
    figure = pareto_figure(report)
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    text = figure.get_tightbbox(renderer)  # inches, every artist's text included
    width = figure.get_size_inches()[0]
    assert text.x1 > width  # the label does overflow the canvas it was drawn on
    with Image.open(plot_pareto(report, tmp_path / "pareto.png")) as png:
        assert png.width >= 110 * text.width and png.height >= 110 * text.height
    assert figure.texts[0].get_text().startswith("RANDOM WEIGHTS")
