"""Reports as people read them: ``report.md`` (:func:`render_markdown`) and ``pareto.png``
(:func:`pareto_figure`), from a :class:`~encoder_fusion.benchmarks.reports.records.Report`.

Every accuracy change is shown with its paired 95 % interval (``+1.2 pp [-0.4, +2.9]``) and every
ratio with its interval (``1.05x [1.01, 1.09]``); the first lines give each fused strategy's verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from encoder_fusion.benchmarks.reports.agreement import agreement_sentence
from encoder_fusion.benchmarks.reports.records import Report, StrategyRecord, TaskAccuracy


def random_encoders(strategies: Sequence[StrategyRecord]) -> list[str]:
    """The encoders that ran on random weights in any strategy, sorted."""
    return sorted({name for s in strategies for name, state in s.weights.items() if state == "random"})


# -- markdown ---------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _ratio(value: float | None, interval: Sequence[float] | None = None) -> str:
    """``1.05x``, with its interval when known: ``1.05x [1.01, 1.09]``."""
    if value is None:
        return "—"
    return f"{value:.2f}x" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def delta_cell(result: TaskAccuracy | None) -> str:
    """A change against the baseline in percentage points with its paired interval:
    ``+1.2 pp [-0.4, +2.9]``."""
    if result is None or result.delta is None:
        return "—"
    delta, interval = result.delta, result.delta_ci
    shown = f"{100 * delta:+.1f} pp"
    return shown + (f" [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]" if interval else "")


def _timing(stats: Mapping | None) -> str:
    return "—" if not stats else f"{stats['median']:.2f} ({stats['p10']:.2f}–{stats['p90']:.2f})"


def planted_encoders(report: Report) -> list[str]:
    """The encoders whose features the harness planted (``experiment=planted``), sorted."""
    return sorted({n for s in report.strategies for n, state in s.weights.items() if state == "planted"})


def random_notice(report: Report) -> str:
    """The line that opens every report of a run with planted features or random encoder weights
    ('' when neither)."""
    planted = planted_encoders(report)
    if planted:
        return (
            f"**PLANTED SIGNAL: the features of encoder(s) {', '.join(planted)} were planted by the harness "
            "from the labels (experiment=planted); the accuracies below show that the harness detects a "
            "real gain, not what any encoder can do. Latency is that of the encoders' architectures.**"
        )
    return random_weights_notice(report.random_encoders or random_encoders(report.strategies))


def unstable_timings(report: Report) -> list[tuple[str, str, dict]]:
    """``(strategy, batch size, stability)`` of every timing that did not reach its target interval
    (one per job: each strategy of a run shares its run's stability)."""
    found, seen = [], set()
    for record in report.strategies:
        for batch, reached in ((record.latency.stability or {}) if record.latency else {}).items():
            key = (record.job, batch)
            if not reached.get("stable", True) and key not in seen:
                seen.add(key)
                found.append((record.name, batch, reached))
    return found


def tiling_lines(report: Report) -> list[str]:
    """The line that says how a tiled run read its images (none for a run without tiling)."""
    tiling = report.run.get("tiling") or {}
    if tiling.get("grid") is None:
        return []
    grid = tiling["grid"]
    shown = f"auto (at most {tiling.get('max_tiles')} tiles)" if grid == "auto" else f"{grid[0]}x{grid[1]}"
    separator = ", a separator after each row of tiles" if tiling.get("newline") else ""
    return [
        f"Tiling: grid {shown}, whole image {tiling.get('thumbnail')}{separator}: every image is read as "
        "tiles, by the probes and by the timed pipelines (visual tokens, TTFT and decode count them)."
    ]


def timing_notice(report: Report) -> str:
    """The line that opens a report whose timing never got its overhead intervals within the target
    ('' when every timing did): the interval reached and the coefficient of variation."""
    unstable = unstable_timings(report)
    if not unstable:
        return ""
    worst = max((reached for _, _, reached in unstable), key=lambda r: r["halfwidth"])
    what = "TTFT" if worst["call"] == "ttft" else "vision pipeline's"
    where = (
        "" if len(unstable) == 1 and not report.jobs else f" (in {len(unstable)} timing(s) of this report)"
    )
    return (
        f"**UNSTABLE TIMING{where}: after {worst['repeats']} rounds (bench.latency.max_repeats) the {what} "
        f"overhead's 95 % interval still spans ±{100 * worst['halfwidth']:.1f} % of the ratio (target "
        f"±{100 * worst['target_halfwidth']:.1f} %), and the timed calls vary by up to "
        f"{100 * worst['cv']:.0f} % (coefficient of variation). The ratios below are noisier than asked: "
        "rerun on an idle machine, or raise bench.latency.max_repeats.**"
    )


def random_weights_notice(names: Sequence[str]) -> str:
    """The first line of a report whose encoders ``names`` ran on random weights ('' for none)."""
    if not names:
        return ""
    return (
        f"**RANDOM WEIGHTS: encoder(s) {', '.join(names)} ran on random weights (no pretrained "
        "checkpoint was found offline); the accuracies below test the pipeline, not the encoders.**"
    )


def accuracy_cell(result: TaskAccuracy | None) -> str:
    """``mean ± std`` in percent, or the error marker."""
    if result is None:
        return "—"
    if result.mean is None:
        return "error"
    return f"{_pct(result.mean)} ± {_pct(result.std or 0.0)}"


def projected_presets(report: Report) -> list[str]:
    """The presets any row has a projected TTFT for, in first-seen order."""
    return list(dict.fromkeys(p for s in report.strategies if s.vlm is not None for p in s.vlm.projected))


def language_model_lines(report: Report) -> list[str]:
    """The lines that name the language model(s) and say what the two ratios mean."""
    vlms = [s.vlm for s in report.strategies if s.vlm is not None]
    if not vlms:
        return [
            "Language model: none (llm=none): overhead = the vision pipeline's end-to-end time / "
            f"{report.baseline}'s, measured in the same run.  "
        ]
    first = vlms[0]
    checkpoint = (report.run.get("llm") or {}).get("weights")
    weights = (
        f"weights of {checkpoint}"
        if checkpoint
        else "random weights; latency does not depend on their values"
    )
    lines = [
        f"Language model: {', '.join(report.llms)} ({weights}) · {first.prompt_tokens} prompt tokens "
        f"after the visual ones · {first.decode_tokens} decode steps  ",
        "overhead = time to first token (raw images in, first token's logits out: one forward of the "
        "transformers VLM of encoder_fusion.hf, i.e. vision, connector and the language model's prefill) "
        f"/ {report.baseline}'s with the same language model, "
        "measured in the same run; vision overhead = the vision pipeline alone / "
        f"{report.baseline}'s.  ",
    ]
    presets = projected_presets(report)
    if presets:
        lines.append(
            f"Projected (not measured): the overhead with {', '.join(presets)} in place of the language "
            "model run here, from the prefill FLOP rate measured here.  "
        )
    return lines


def verdict_lines(report: Report) -> list[str]:
    """One line per fused strategy with a verdict: the verdict, each task's change, the overheads,
    the accuracy bought per +10 % of time to first token and of vision time, and the budget."""
    lines = []
    for record in report.strategies:
        if record.verdict is None:
            continue
        changes = "; ".join(f"{task} {delta_cell(record.accuracy.get(task))}" for task in report.tasks)
        cost = f"overhead {_ratio(record.overhead(), record.overhead_ci())}"
        if record.vlm is not None:
            cost += f", vision {_ratio(record.vision_overhead(), record.vision_overhead_ci())}"
        tradeoff = record.tradeoff or {}
        bought = []
        for key, what in (("pp_per_10pct_ttft", "TTFT"), ("pp_per_10pct_vision", "vision time")):
            per_task = {t: v for t, v in (tradeoff.get(key) or {}).items() if v is not None}
            if per_task:
                shown = ", ".join(f"{v:+.2f} ({t})" for t, v in per_task.items())
                bought.append(f"pp per +10 % {what}: {shown}")
        budget = tradeoff.get("max_overhead")
        if budget is not None and tradeoff.get("fits_budget") is not None:
            bought.append(f"{'fits' if tradeoff['fits_budget'] else 'exceeds'} the {budget:.2f}x budget")
        lines.append(
            f"- **{record.name}: {record.verdict}**: {changes} · {cost}" + "".join(f" · {b}" for b in bought)
        )
    if lines:
        lines = [
            "Verdicts (gain: some task's 95 % interval lies above 0 and none below; worse: the reverse; "
            "no detectable gain: otherwise):",
            "",
            *lines,
            "",
        ]
    return lines


def detection_lines(report: Report) -> list[str]:
    """Where a test split is too small for a fused strategy's change to detect
    ``bench.min_detectable_pp``, and how many items it would take."""
    lines = []
    for record in report.strategies:
        if record.role != "fused":
            continue
        for task in report.tasks:
            result = record.accuracy.get(task)
            detection = (result.detection if result else None) or {}
            if detection.get("needed_items") is None:
                continue
            size = "?" if result is None or result.test_size is None else result.test_size
            lines.append(
                f"- {record.name} / {task}: {size} test items cannot detect a "
                f"{100 * detection['min_detectable']:.1f} pp change (the interval's half-width is "
                f"{100 * detection['half_width']:.1f} pp); about {detection['needed_items']} would."
            )
    return ["Too few test items:", "", *lines, ""] if lines else []


def sweep_lines(report: Report) -> list[str]:
    """An aggregate's jobs with and without a result, near the top, so that a missing job is seen."""
    run = report.run
    if "finished" not in run:
        return []
    text = f"Sweep: {run['finished']} job(s) with a result"
    if report.failed_jobs:
        text += f", **{len(report.failed_jobs)} without** (see Errors)"
    if run.get("planned") is not None:
        text += f"; its last launch planned {run['planned']}"
    return [text + ".", ""]


def skipped_lines(skipped: Mapping[str, Sequence[Mapping]] | None, shown: int = 20) -> list[str]:
    """The images left out as unusable (``data.on_bad_image=skip``), counted per split and named (the
    first ``shown``; the JSON lists every one), or nothing when none was."""
    skipped = {which: files for which, files in (skipped or {}).items() if files}
    if not skipped:
        return []
    counts = ", ".join(f"{len(files)} of the {which} split" for which, files in skipped.items())
    lines = ["## Skipped images", "", f"Left out as unusable (data.on_bad_image=skip): {counts}.", ""]
    every = [(which, item) for which, files in skipped.items() for item in files]
    lines += [f"- {which}: {item['error']}" for which, item in every[:shown]]
    if len(every) > shown:
        lines.append(f"- and {len(every) - shown} more (the JSON report lists them all)")
    return lines


def render_markdown(report: Report) -> str:
    """The report as markdown: the random-weights notice first (when any), the verdicts, the language
    model, then one table with a row per strategy (accuracy ± std and change against CLIP-only with
    its interval per task, visual tokens, TTFT and its overhead, the vision-only overhead, the language
    model's share of TTFT, decode speed, projected overheads, peak memory, parameters, GFLOPs), then
    the tasks whose test split is too small, and any errors."""
    lines = []
    for notice in (random_notice(report), timing_notice(report)):
        if notice:
            lines += [notice, ""]
    env, strategies = report.environment, report.strategies
    first_latency = next((s.latency for s in strategies if s.latency), None)
    with_llm = any(s.vlm is not None for s in strategies)
    presets = projected_presets(report)
    lines += [
        "# encoder-fusion benchmark",
        "",
        *sweep_lines(report),
        *verdict_lines(report),
        *language_model_lines(report),
        f"Device: {env.get('device')} · torch {env.get('torch')} · {env.get('date')}  ",
        f"Command: `{env.get('command')}`  ",
        f"Latency: batch {first_latency.batch_size if first_latency else '—'}, "
        f"{first_latency.dtype if first_latency else '—'}, "
        f"compile {'on' if first_latency and first_latency.compile else 'off'}; median (p10–p90) in ms.",
        *tiling_lines(report),
        "",
    ]
    tasks = report.tasks
    metrics = {
        t: next((s.accuracy[t].metric or "" for s in strategies if t in s.accuracy), "") for t in tasks
    }
    header = ["strategy", "encoders", "weights"]
    for task in tasks:
        header += [f"{task} {metrics[task]} (%)", "Δ vs CLIP [95 % CI]"]
    header += ["visual tokens"]
    if with_llm:
        header += ["TTFT ms", "overhead", "vision overhead", "LLM share of TTFT", "decode tok/s"]
        header += [f"overhead with {p} (projected)" for p in presets]
    header += ["vision ms"] + ([] if with_llm else ["overhead"])
    header += ["peak mem MB", "params trainable / total", "GFLOPs/img"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in strategies:
        name = f"**{record.name}**" if record.role == "fused" else record.name
        weights = ", ".join(f"{k}: {v}" for k, v in record.weights.items()) or "—"
        row = [name, " + ".join(record.encoders) or "—", weights]
        for task in tasks:
            result = record.accuracy.get(task)
            row += [accuracy_cell(result), delta_cell(result)]
        row.append("—" if record.tokens is None else str(record.tokens))
        vlm = record.vlm
        if with_llm:
            rate = vlm.decode_tokens_per_s if vlm else None
            row += [
                _timing(vlm.ttft if vlm else None),
                _ratio(record.overhead() if vlm else None, record.overhead_ci() if vlm else None),
                _ratio(record.vision_overhead(), record.vision_overhead_ci()),
                "—" if vlm is None else f"{100 * vlm.llm_share:.0f} %",
                "—" if not rate else f"{rate['median']:.1f}",
            ]
            row += [_ratio(((vlm.projected if vlm else {}).get(p) or {}).get("ratio")) for p in presets]
        row.append(_timing(record.latency.end_to_end if record.latency else None))
        if not with_llm:
            row.append(_ratio(record.overhead(), record.overhead_ci()))
        peak = record.memory.peak_mb if record.memory else None
        row.append(f"{peak:.0f}" if peak is not None else "—")
        params = record.params
        row.append(f"{params.trainable / 1e6:.2f}M / {params.total / 1e6:.2f}M" if params else "—")
        row.append(f"{record.gflops:.3g}" if record.gflops is not None else "—")
        lines.append("| " + " | ".join(row) + " |")
    detection = detection_lines(report)
    if detection:
        lines += ["", *detection[:-1]]
    memory_kinds = sorted({s.memory.kind for s in strategies if s.memory})
    if memory_kinds:
        scope = "the whole VLM's first token" if with_llm else "the vision pipeline"
        lines += ["", f"Peak memory ({scope}): {'; '.join(memory_kinds)}."]
    lines += agreement_lines(report)
    skipped = skipped_lines(report.run.get("skipped_images"))
    if skipped:
        lines += ["", *skipped]
    errors = [(s.name, e) for s in strategies for e in s.errors]
    if errors or report.failed_jobs:
        lines += ["", "## Errors", ""]
        lines += [f"- {name} / {e['where']}: {e['error']}" for name, e in errors]
        lines += [f"- job {job['job']}: {job['error']}" for job in report.failed_jobs]
    return "\n".join(lines) + "\n"


def agreement_lines(report: Report) -> list[str]:
    """The cheap probes' rank agreement with the VLM probe (``report.probe_agreement``), or nothing."""
    rows = report.probe_agreement
    if not rows:
        return []

    def with_ci(value, interval) -> str:
        if value is None:
            return "— (constant deltas)"
        return f"{value:+.2f}" + ("" if interval is None else f" [{interval[0]:+.2f}, {interval[1]:+.2f}]")

    lines = [
        "",
        "## Can the cheap probes stand in for the VLM probe?",
        "",
        f"{agreement_sentence(rows)} Rank correlation of each probe's deltas with the vlm probe's over "
        "the strategies, 95 % intervals over resampled test items.",
        "",
        "| probe | Spearman [95 % CI] | Kendall [95 % CI] | verdict |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {row['probe']} | {with_ci(row['spearman'], row['spearman_ci'])} | "
        f"{with_ci(row['kendall'], row['kendall_ci'])} | {row['verdict']} |"
        for row in rows
    ]
    return lines


# -- plot -------------------------------------------------------------------------------------------
