"""What the feature cache's content key costs, beside decoding the same images.

    python -m encoder_fusion.benchmarks.features.content_key_cost --out benchmarks/results/content_key.json

Every run of the benchmark decodes every image of its splits (the probes need the pixels even when
every feature is cached), so the price of knowing a file by its contents is best read against that.
Per set of images (a dataset's, or a folder's), three passes run in turn, round after round, so
drift hits them alike:

* ``full``: the default ``bench.content_key=full``, the sha256 of every byte of every file;
* ``quick``: ``bench.content_key=quick`` with its index warm (size, mtime and end blocks read);
* ``decode``: every file decoded by the project's image reader, as a run does.

``x decode`` is the median pass over the median decode, with a 95 % interval over paired resamples
of the rounds; ``s/GB`` is the median full pass over the folder's size. The files are read through
the page cache after the first round, as a rerun reads them; a cold first read is paid once, by the
hash and the decode together.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from encoder_fusion.benchmarks.datasets import DATASETS, ENV_VAR, IMAGE_SUFFIXES, build_dataset
from encoder_fusion.benchmarks.features.fingerprint import FileIndex
from encoder_fusion.benchmarks.kernel.harness import header_lines, report_header, save_report, tool_parser
from encoder_fusion.benchmarks.reports.stats import ratio_ci
from encoder_fusion.benchmarks.timing.timer import Timer, round_robin
from encoder_fusion.images import read_image

MODULE = "encoder_fusion.benchmarks.features.content_key_cost"
PASSES = ("full", "quick", "decode")
DEFAULT_DATASETS = ("coco128", "tinyimagenet")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = tool_parser(MODULE, __doc__)
    parser.add_argument(
        "--folder",
        type=Path,
        nargs="+",
        default=None,
        help=f"image folders to measure, every image under each (default: the image files of the "
        f"datasets {', '.join(DEFAULT_DATASETS)} under ${ENV_VAR})",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here and the table beside it")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error(f"--rounds must be at least 3, got {args.rounds}")
    if args.folder is None and not os.environ.get(ENV_VAR):
        parser.error(f"give --folder, or set {ENV_VAR} to the folder of the datasets")
    for folder in args.folder or ():
        if not folder_images(folder):
            parser.error(f"--folder {folder} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    return args


def folder_images(folder: Path) -> list[Path]:
    """Every image file under ``folder``, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def dataset_images(name: str) -> list[Path]:
    """The image files a run of dataset ``name`` (under ``$FUSION_DATA``) hashes: those of every split."""
    splits = DATASETS[name].SPLITS or (None,)
    return [path for split in splits for path in build_dataset(name, None, split=split).image_paths()]


def measure(files: Sequence[Path], rounds: int) -> dict:
    """The three passes over ``files``, ``rounds`` times in turn (a first, untimed round warms the
    page cache and the quick index)."""
    with tempfile.TemporaryDirectory() as scratch:
        full, quick = FileIndex(Path(scratch) / "full"), FileIndex(Path(scratch) / "quick", "quick")
        passes: dict[tuple[str, str], Callable[[], object]] = {
            ("full", ""): lambda: full.content_hashes(files),
            ("quick", ""): lambda: quick.content_hashes(files),
            ("decode", ""): lambda: [read_image(path) for path in files],
        }
        samples = round_robin(Timer(torch.device("cpu")), passes, warmup=1, repeats=rounds)
    seconds = {name: [ms / 1e3 for ms in samples[name, ""]] for name in PASSES}
    size = sum(path.stat().st_size for path in files)
    row: dict = {"files": len(files), "bytes": size}
    for name in PASSES:
        row[f"{name}_s"] = statistics.median(seconds[name])
    for name in ("full", "quick"):
        row[f"{name}_x_decode"] = row[f"{name}_s"] / row["decode_s"]
        row[f"{name}_x_decode_ci"] = ratio_ci(seconds[name], seconds["decode"], 2000)
    row["full_s_per_gb"] = row["full_s"] / (size / 1e9)
    return row


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.folder is None:
        named = {name: dataset_images(name) for name in DEFAULT_DATASETS}
    else:
        named = {str(folder): folder_images(folder) for folder in args.folder}
    rows = [{"images": name, **measure(files, args.rounds)} for name, files in named.items()]
    report = {**report_header(MODULE, argv, torch.device("cpu")), "rounds": args.rounds, "rows": rows}
    lines = [
        "# The feature cache's content key against decoding the same images",
        "",
        *header_lines(report),
        f"- median of {args.rounds} rounds, the three passes in turn, page cache warm; "
        "x decode: the pass / decoding every file, 95 % interval",
        "",
        "| images | files | MB | full s | full s/GB | full x decode [95 % CI] | quick s "
        "| quick x decode [95 % CI] | decode s |",
        "|---|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for row in rows:
        cells = [row["images"], str(row["files"]), f"{row['bytes'] / 1e6:.1f}"]
        cells += [f"{row['full_s']:.3f}", f"{row['full_s_per_gb']:.2f}"]
        for name in ("full", "quick"):
            low, high = row[f"{name}_x_decode_ci"]
            ratio = f"{row[f'{name}_x_decode']:.3f} [{low:.3f}, {high:.3f}]"
            cells += [ratio] if name == "full" else [f"{row['quick_s']:.3f}", ratio]
        cells.append(f"{row['decode_s']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    save_report(args.out, report, table)


if __name__ == "__main__":
    main()
