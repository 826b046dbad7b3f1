"""The notebooks run top to bottom, on the interpreter running the tests, and a raising cell fails them.

Each notebook is executed by nbclient in a fresh kernel started from ``sys.executable`` (a kernel
spec written into a temporary folder, so no ``ipykernel install`` is needed), inside a temporary
working directory, with the test process's environment (``FUSION_DATA`` included). With
``FUSION_DOCS_DIR=$PWD/docs`` these tests also regenerate the README's figures.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_code_cell, new_notebook

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
QUICKSTART = NOTEBOOKS / "01_quickstart.ipynb"
SWEEP_ANALYSIS = NOTEBOOKS / "02_sweep_analysis.ipynb"
VLM = NOTEBOOKS / "03_vlm.ipynb"
KERNEL_NAME = "encoder-fusion-tests"
CELL_TIMEOUT_S = 300
FIGURE_LIMIT_BYTES = 300 * 1024
# the figures each notebook writes into $FUSION_DOCS_DIR
FIGURES = {
    QUICKSTART.name: ("pca_tokens.png", "latency_stages.png"),
    SWEEP_ANALYSIS.name: ("pareto.png", "task_gains.png", "layer_weights.png"),
}


def kernel_manager(spec_root: Path, env: dict[str, str]) -> KernelManager:
    """A kernel manager whose kernel is ``sys.executable -m ipykernel_launcher`` with ``env`` added.

    The spec lives in ``spec_root`` under a name of its own, so neither a registered ``python3``
    spec nor the ``python`` on PATH decides which interpreter (and which installed packages) runs.
    """
    folder = spec_root / KERNEL_NAME
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "encoder-fusion tests",
        "language": "python",
        "env": env,
    }
    (folder / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return KernelManager(
        kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_root)])
    )


def execute_notebook(
    notebook: nbformat.NotebookNode | Path,
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout: int = CELL_TIMEOUT_S,
) -> nbformat.NotebookNode:
    """Run every cell of ``notebook`` in a fresh kernel with ``workdir`` as its working directory.

    Args:
        notebook: a notebook file or an in-memory notebook.
        workdir: the kernel's working directory (created when missing).
        env: variables set in the kernel on top of this process's environment.
        timeout: seconds one cell may take.

    Returns:
        The executed notebook, outputs filled in.

    Raises:
        CellExecutionError: a cell raised; the message holds the cell's traceback.
        TimeoutError: a cell ran longer than ``timeout``.
    """
    if isinstance(notebook, Path):
        notebook = nbformat.read(notebook, as_version=4)
    workdir.mkdir(parents=True, exist_ok=True)
    # the repository first on the path: the notebooks import encoder_fusion and benchmarks even when the
    # project is not installed in this interpreter
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    # figures display inline (as in Jupyter) even when the caller's environment picks another backend
    inline = "module://matplotlib_inline.backend_inline"
    km = kernel_manager(workdir / ".kernels", {"PYTHONPATH": path, "MPLBACKEND": inline, **(env or {})})
    client = NotebookClient(notebook, km=km, timeout=timeout, resources={"metadata": {"path": str(workdir)}})
    return client.execute()


def outputs_text(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook's cells printed or displayed as text, in order."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
            elif "text/plain" in output.get("data", {}):
                parts.append(output["data"]["text/plain"])
    return "\n".join(parts)


def image_outputs(notebook: nbformat.NotebookNode) -> int:
    """How many PNG images the executed notebook displayed."""
    return sum(
        "image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", [])
    )


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG file's header; fails when the file is not a PNG."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    return struct.unpack(">II", header[16:24])


def check_figures(notebook: Path, docs_dir: Path) -> None:
    """Every figure ``notebook`` promises is in ``docs_dir``: a real, non-trivial PNG under the size limit."""
    for name in FIGURES[notebook.name]:
        path = docs_dir / name
        assert path.is_file(), f"{notebook.name} did not write {name} into FUSION_DOCS_DIR"
        width, height = png_size(path)
        assert width >= 200 and height >= 150, f"{name} is only {width}x{height} pixels"
        assert path.stat().st_size < FIGURE_LIMIT_BYTES, f"{name} is {path.stat().st_size} bytes"


# appended to the sweep notebook: what its layer-weights figure drew, panel by panel, as one JSON line
PLOTTED_CELL = """
import json

print("PLOTTED " + json.dumps([
    {
        "strategy": name,
        "encoder": encoder,
        "tasks": [label.get_text() for label in axis.get_yticklabels()],
        "weights": axis.images[0].get_array().tolist(),
    }
    for axis, (name, encoder) in zip(axes.flat, panels)
]))
"""


def sweep_notebook_with_plot_readout() -> nbformat.NotebookNode:
    """The sweep notebook with :data:`PLOTTED_CELL` appended."""
    notebook = nbformat.read(SWEEP_ANALYSIS, as_version=4)
    notebook.cells.append(new_code_cell(PLOTTED_CELL))
    return notebook


def check_plotted_layer_weights(text: str, panels: int) -> None:
    """The layer weights the sweep notebook drew are those of the report it read, exactly: every
    (strategy, encoder) with layer weights in report.json has its panel, one row per task with
    weights, in the report's task order; ``panels`` panels in all."""
    report = json.loads(Path(re.search(r"^report: (.+)$", text, re.M).group(1)).read_text(encoding="utf-8"))
    plotted = json.loads(re.search(r"^PLOTTED (.+)$", text, re.M).group(1))
    expected = {}
    for record in report["strategies"]:
        for task in report["tasks"]:
            extra = (record["accuracy"].get(task) or {}).get("extra") or {}
            for encoder, weights in (extra.get("layer_weights") or {}).items():
                expected.setdefault((record["name"], encoder), {})[task] = weights
    assert len(plotted) == len(expected) == panels, (plotted, expected)
    for panel in plotted:
        rows = expected[(panel["strategy"], panel["encoder"])]
        assert panel["tasks"] == list(rows), panel
        assert panel["weights"] == list(rows.values()), panel


def docs_env(tmp_path: Path) -> dict[str, str]:
    """``FUSION_DOCS_DIR`` as set by the caller (regenerating docs/), else a temporary folder."""
    return {"FUSION_DOCS_DIR": os.environ.get("FUSION_DOCS_DIR") or str(tmp_path / "docs")}


# -- the helper itself --------------------------------------------------------------------------
def test_a_raising_cell_fails_the_run(tmp_path):
    notebook = new_notebook(
        cells=[
            new_code_cell("value = 6 * 7"),
            new_code_cell("raise RuntimeError(f'cell failed on purpose with {value}')"),
            new_code_cell("open('after.txt', 'w').write('ran')"),
        ]
    )
    with pytest.raises(CellExecutionError, match="cell failed on purpose with 42"):
        execute_notebook(notebook, tmp_path)
    assert not (tmp_path / "after.txt").exists(), "cells after the failing one must not run"


def test_kernel_runs_this_interpreter_in_the_working_dir_with_the_environment(tmp_path):
    notebook = new_notebook(
        cells=[
            new_code_cell(
                "import os, sys\nprint(sys.executable)\nprint(os.getcwd())\nprint(os.environ['PROBE'])"
            )
        ]
    )
    executed = execute_notebook(notebook, tmp_path / "work", env={"PROBE": "passed-through"})
    printed = outputs_text(executed).split()
    assert Path(printed[0]).resolve() == Path(sys.executable).resolve()
    assert Path(printed[1]).resolve() == (tmp_path / "work").resolve()
    assert printed[2] == "passed-through"


@pytest.mark.parametrize("path", [QUICKSTART, SWEEP_ANALYSIS, VLM], ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them before committing"


# -- the notebooks ------------------------------------------------------------------------------
@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(tmp_path):
    env = docs_env(tmp_path)
    executed = execute_notebook(QUICKSTART, tmp_path / "work", env=env)
    text = outputs_text(executed)
    assert "fused / clip_only = " in text
    assert image_outputs(executed) >= 2
    check_figures(QUICKSTART, Path(env["FUSION_DOCS_DIR"]))


@pytest.mark.slow
def test_quickstart_falls_back_to_synthetic_images_without_coco(tmp_path):
    notebook = nbformat.read(QUICKSTART, as_version=4)
    # only the setup and the data cells: enough to see which dataset was chosen
    notebook.cells = [c for c in notebook.cells if {"setup", "data"} & set(c.metadata.get("tags", []))]
    assert len(notebook.cells) == 2, "the quickstart lost its 'setup' or 'data' cell tag"
    empty = tmp_path / "no-datasets"
    empty.mkdir()
    executed = execute_notebook(notebook, tmp_path / "work", env={"FUSION_DATA": str(empty)})
    text = outputs_text(executed)
    assert "COCO128 not found" in text
    assert "dataset synthetic (generated): images (4, 3, 224, 224) torch.uint8" in text


@pytest.mark.slow
def test_vlm_notebook_builds_generates_trains_saves_and_reloads(tmp_path):
    text = outputs_text(execute_notebook(VLM, tmp_path / "work"))
    assert "FusedLlavaForConditionalGeneration | image features per image: 16 tokens of width 64" in text
    assert "{'input_ids': (2, 37), 'attention_mask': (2, 37), 'pixel_values': (3, 3, 64, 64)}" in text
    assert "no frozen parameter changed" in text
    assert "reloaded: FusedLlavaForConditionalGeneration | the same greedy answers:" in text
    assert "| clip | timm | `vit_base_patch16_clip_224.openai` |" in text


@pytest.mark.slow
def test_sweep_analysis_runs_its_own_sweep_then_reads_a_given_one(tmp_path):
    env = {**docs_env(tmp_path), "TMPDIR": str(tmp_path)}
    env.pop("FUSION_REPORT", None)
    first = execute_notebook(
        sweep_notebook_with_plot_readout(), tmp_path / "work", env={**env, "FUSION_REPORT": ""}
    )
    assert image_outputs(first) >= 3
    # the COMM job's three strategies use weighted_ln (prismatic's take the last layer): CLIP alone,
    # DINOv2 alone and both encoders of the fused one
    check_plotted_layer_weights(outputs_text(first), panels=4)
    check_figures(SWEEP_ANALYSIS, Path(env["FUSION_DOCS_DIR"]))
    # the sweep it ran (a temporary folder, here under tmp_path) is there to be read again: this time
    # one job's folder, the COMM job whose strategies use weighted_ln
    sweeps = sorted(tmp_path.glob("fusion-sweep-*"))
    assert len(sweeps) == 1 and (sweeps[0] / "report.json").is_file()
    comm_job = next(
        path.parent
        for path in sweeps[0].glob("*/report.json")
        if any(s["name"] == "comm" for s in json.loads(path.read_text(encoding="utf-8"))["strategies"])
    )
    docs_again = tmp_path / "docs-again"
    again = execute_notebook(
        sweep_notebook_with_plot_readout(),
        tmp_path / "work-again",
        env={"FUSION_REPORT": str(comm_job), "FUSION_DOCS_DIR": str(docs_again)},
    )
    text = outputs_text(again)
    assert f"report: {comm_job / 'report.json'}" in text
    assert "fusion-bench" not in text and "fusion-report" not in text, "nothing should run again"
    check_plotted_layer_weights(text, panels=4)
    check_figures(SWEEP_ANALYSIS, docs_again)
