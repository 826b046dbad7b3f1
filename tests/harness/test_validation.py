"""Every setting is checked before any encoder runs or any image is read: a bad value ends the run at
once, naming the key, the value and what is accepted, and the command line exits non-zero with that
one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_runs import smoke_config
from PIL import Image

from encoder_fusion.benchmarks.run import run_benchmark

REPO = Path(__file__).resolve().parents[2]
BENCH = "from encoder_fusion.benchmarks.cli import bench_main; bench_main()"


def write_imagefolder(root: Path, classes: tuple[str, ...]) -> Path:
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (24, 24), (40 * index, 7 * i, 90)).save(root / name / f"{i}.png")
    return root


BAD_SETTINGS = [
    # unknown keys, however added
    (["+task.epoch=3"], r"task\.epoch=3 is not a setting; accepted under task: names, seeds, epochs, lr"),
    (
        ["++bench.latency.warmups=2"],
        r"bench\.latency\.warmups=2 is not a setting; accepted under bench\.latency",
    ),
    (["+foo=1"], r"foo=1 is not a setting; accepted under the top level: encoders, hooks"),
    (["+hooks.clip.depth=3"], r"hooks\.clip\.depth=3 is not a setting; accepted under hooks\.clip: layers"),
    (["+data.options.bogus=1"], r"dataset 'synthetic' got unknown option\(s\) \['bogus'\]"),
    (["+align.options.foo=1"], r"align='bilinear' got unknown option\(s\) \['foo'\]; accepted: none"),
    (["+fusion.layer_merge.options.gate=1"], r"layer_merge='last' got unknown option\(s\) \['gate'\]"),
    # ranges
    (["task.seeds=[]"], r"task\.seeds=\[\] must be a non-empty list of ints"),
    (["task.epochs=-1"], r"task\.epochs=-1 must be a positive, finite int"),
    (["task.lr=-1"], r"task\.lr=-1\.0 must be a positive, finite int or float"),
    (["task.lr=nan"], r"task\.lr=nan must be a positive, finite"),
    (["task.batch_size=0"], r"task\.batch_size=0 must be a positive, finite int"),
    (["task.weight_decay=-1"], r"task\.weight_decay=-1\.0 must be a finite number >= 0"),
    (["task.names=[]"], r"task\.names=\[\] names no probe; accepted: one or more of classification"),
    (["bench.latency.batch_sizes=[0]"], r"bench\.latency\.batch_sizes=0 must be an int >= 1"),
    (["bench.latency.repeats=0"], r"bench\.latency\.repeats=0 must be an int >= 1"),
    (["bench.threads=0"], r"bench\.threads=0 must be null \(keep torch's count\) or an int >= 1"),
    (["bench.extract_batch_size=0"], r"bench.extract_batch_size=0 must be a positive int"),
    (["bench.content_key=sha1"], r"bench\.content_key='sha1' is unknown; accepted: full, quick"),
    (["data.on_bad_image=ignore"], r"data\.on_bad_image='ignore' is unknown; accepted: skip, stop"),
    (["bench.ci_resamples=0"], r"bench\.ci_resamples=0 must be an int >= 100"),
    (["bench.max_overhead=0.5"], r"bench\.max_overhead=0\.5 must be null or a ratio > 1"),
    (["plant.noise=-1"], r"plant\.noise=-1\.0 must be a finite number >= 0"),
    (["data.limit=0"], r"limit must be a positive int, got 0"),
    (["data.test_fraction=1.5"], r"test_fraction must be a number in \(0, 1\), got 1\.5"),
    (["data.image_size=0"], r"data\.image_size=0 must be an int >= 1"),
    (["data.options.image_size=8"], r"synthetic image_size must be an int >= 16, got 8"),
    # seeds: distinct, and within what torch's generators take
    (["task.seeds=[0,0]"], r"task\.seeds=\[0, 0\] repeats \[0\]: each seed runs once; accepted: distinct"),
    (["seed=-1"], r"seed=-1 must be an int in \[0, 9223372036854775807\] \(2\*\*63 - 1\)"),
    (
        ["seed=99999999999999999999"],
        r"seed=99999999999999999999 must be an int in \[0, 9223372036854775807\]",
    ),
    # a key the selected config group member does not read
    (
        ["data.root=/tmp"],
        r"data\.root=/tmp is not read by data=synthetic, which makes its own images; accepted: select the "
        r"data that reads it \(data=coco128, data=imagefolder, data=tinyimagenet\), or leave data\.root "
        r"unset",
    ),
    # sizes the machine cannot hold, refused before allocation
    (
        ["data.image_size=100000"],
        # 64 images x 100,000^2 pixels x (3 uint8 channels + an int64 mask class) = 7,040 GB
        r"data\.image_size=100000 \(64 images decoded at 100000x100000, with their masks\) needs about "
        r"7,040\.0 GB, more than",
    ),
    (
        ["align.grid=[100000,100000]"],
        r"strategy 'clip_only' .*: grid 100000x100000 \(one image's aligned layers\) needs about "
        r"1,280\.0 GB, more than the [\d,.]+ GB free on cpu",
    ),
    (
        ["encoders.clip.model_kwargs.depth=0"],
        r"encoders\.clip \(timm vit_base_patch16_clip_224\.openai with "
        r"encoders\.clip\.model_kwargs=\{'depth': 0",
    ),
    (["encoders.clip.image_size=0"], r"EncoderSpec\.image_size must be a positive int"),
    # split sizes
    (["data.options.num_images=1"], r"data=synthetic gives 1 train and 0 test images .*accepted: settings"),
    # what needs the built encoders (none has run)
    (["data.image_size=8"], r"data\.image_size=8 is smaller than one 16-pixel patch of encoder 'clip'"),
    (["hooks.clip.layers=[99]"], r"HookSpec\.layers index 99 is out of range for encoder 'clip'"),
    (["llm=none", "connector.out_dim=0"], r"strategy 'clip_only' .*connector out_dim must be a positive"),
    (["connector.out_dim=0"], r"connector\.out_dim=0 cannot feed llm=tiny \(hidden size 32\); accepted: 32"),
    (
        ["align.grid=[0,0]"],
        r"strategy 'clip_only' .*grid must be a positive int or an \(height, width\) pair",
    ),
    (["fusion.merge_dim=-1"], r"strategy 'eagle' .*merge_dim must be None or a positive int, got -1"),
    (["fusion=comm", "fusion.merge_dim=-1"], r"strategy 'comm' .*merge_dim must be None or a positive int"),
    (["align=pixel_unshuffle", "align.grid=[3,3]"], r"cannot fold a 4x4 grid onto 3x3"),
    (["experiment=layer_scan", "task.epochs=0"], r"task\.epochs=0 must be a positive, finite int"),
    # the cheap probes and the VLM probe
    (
        ["task=correspondence", "task.correspondence.shift=[3,0]"],
        r"task\.correspondence=.* leaves no overlap",
    ),
    (
        ["task=correspondence", "task.correspondence.threshold=0"],
        r"task\.correspondence\.threshold=0\.0 must be",
    ),
    (["task=knn", "task.knn.k=0"], r"task\.knn\.k=0 must be an int >= 1"),
    (
        ["task=knn", "task.knn.k=500"],
        r"task\.knn\.k=500 is larger than the \d+ train images of data=synthetic",
    ),
    (
        ["task=vlm", "llm=none"],
        r"holds vlm, which trains the fusion head against a language model, but llm=none",
    ),
    (["task=vlm", "task.vlm.options=1"], r"task\.vlm\.options=1 must be an int >= 2"),
    (["task=vlm", "+task.vlm.templates.colour=which ?"], r"task\.vlm\.templates=.* unknown kind 'colour'"),
    (
        ["task=vlm", "llm.vocab_size=8"],
        r"hold \d+ distinct words, but the language model's vocabulary leaves 6",
    ),
    (["task=vlm", "llm.weights=''"], r"llm\.weights='' must name a checkpoint folder or hub repo id"),
    (
        ["tiling=2x2", "data.image_size=24"],
        r"tiling\.grid=\[2, 2\] cuts data\.image_size=24 images into 12x12 tiles, smaller than one 16-pixel "
        r"patch of encoder 'clip'; accepted: data\.image_size >= 32, or a smaller grid",
    ),
    (
        ["tiling=2x2", "tiling.thumbnail=middle"],
        r"tiling\.thumbnail='middle' is unknown; accepted: first, last",
    ),
    (["tiling=anyres_max9", "tiling.max_tiles=0"], r"tiling\.max_tiles=0 must be an int >= 1"),
    (["tiling=2x2", "tiling.grid=[0,2]"], r"tiling\.grid=\(0, 2\) must be \[rows, cols\] of ints >= 1"),
    (
        ["tiling=2x2", "plant.clip=class"],
        r"plant\.clip=class plants a signal per whole image, which tiling cuts into regions; accepted: "
        r"tiling=none, or plant\.clip=null and plant\.dino=null",
    ),
    (
        ["tiling=2x2", "task=correspondence"],
        r"the correspondence probe warps whole images, which tiling cuts; accepted: tiling=none, or",
    ),
    (
        ["tiling=2x2", "bench.mode=layer_scan"],
        r"tiling applies to bench\.mode=compare, got bench\.mode=layer_scan",
    ),
    (["bench.latency.max_repeats=2"], r"bench\.latency\.max_repeats=2 must be >= bench\.latency\.repeats=3"),
    (["task=vlm", "task.vlm.lora.rank=-1"], r"task\.vlm\.lora\.rank=-1 must be an int >= 0"),
    (
        ["task=vlm", "task.vlm.lora.rank=4", "task.vlm.lora.target_modules=[wq]"],
        r"task\.vlm\.lora\.target_modules=\['wq'\]: \['wq'\] are not layers of llm=tiny; accepted: "
        r"down_proj, gate_proj",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_SETTINGS, ids=[" ".join(o) for o, _ in BAD_SETTINGS])
def test_a_bad_setting_fails_before_any_work(overrides, message, tmp_path, nothing_runs):
    with pytest.raises(ValueError, match=message) as caught:
        run_benchmark(smoke_config(f"bench.cache_dir={tmp_path / 'cache'}", *overrides), tmp_path / "run")
    assert "\n" not in str(caught.value)  # one line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_setting_without_a_gpu_fails_before_any_work(tmp_path, nothing_runs):
    with pytest.raises(ValueError, match=r"bench\.device='cuda' but CUDA is not available; accepted: cpu"):
        run_benchmark(smoke_config("bench.device=cuda"), tmp_path)


def test_tasks_must_fit_the_data(tmp_path, nothing_runs):
    one = write_imagefolder(tmp_path / "one", ("cat",))
    with pytest.raises(
        ValueError, match=r"classification needs at least 2 label classes, and data=imagefolder"
    ):
        run_benchmark(smoke_config("data=imagefolder", f"data.root={one}"), tmp_path / "a")
    two = write_imagefolder(tmp_path / "two", ("cat", "dog"))
    for task, annotation in (("dense", "mask"), ("localization", "box")):
        with pytest.raises(
            ValueError,
            match=rf"{task} needs a {annotation} on each image it reads, and no image of a "
            rf"data=imagefolder split has one; accepted for this data: "
            rf"\['classification', 'correspondence', 'knn', 'vlm'\]",
        ):
            run_benchmark(
                smoke_config("data=imagefolder", f"data.root={two}", f"task={task}"), tmp_path / "b"
            )


def test_vlm_questions_the_data_cannot_answer_fail_before_any_work(tmp_path, datasets_root, nothing_runs):
    cfg = smoke_config("data=tinyimagenet", f"data.root={datasets_root}", "data.limit=400", "task=vlm")
    with pytest.raises(
        ValueError,
        match=r"task\.vlm\.templates\.size='how large is the object \?' asks from each "
        r"image's mask, and no image of a data=tinyimagenet split has one",
    ):
        run_benchmark(cfg, tmp_path)


def test_a_language_model_checkpoint_that_is_not_there_fails_before_any_work(tmp_path, nothing_runs):
    with pytest.raises(FileNotFoundError, match=r"weights file or folder not found: .*absent"):
        run_benchmark(smoke_config("task=vlm", f"llm.weights={tmp_path / 'absent'}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_lora_without_peft_fails_before_any_work(tmp_path, nothing_runs, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(
        ValueError, match=r"task\.vlm\.lora\.rank=4 > 0 asks for LoRA adapters, which need peft"
    ):
        run_benchmark(smoke_config("task=vlm", "task.vlm.lora.rank=4"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_dense_on_a_dataset_without_masks_fails_before_any_work(tmp_path, datasets_root, nothing_runs):
    with pytest.raises(
        ValueError,
        match=r"dense needs a mask .*accepted for this data: \['classification', 'correspondence', 'knn', "
        r"'loc",
    ):
        run_benchmark(
            smoke_config("data=tinyimagenet", f"data.root={datasets_root}", "data.limit=400", "task=all"),
            tmp_path,
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+task.epoch=3", "task.epoch=3 is not a setting; accepted under task:"),
        ("task.lr=-1", "task.lr=-1.0 must be a positive, finite int or float"),
        ("align.grid=[0,0]", "grid must be a positive int or an (height, width) pair, got [0, 0]"),
    ],
)
def test_the_command_line_exits_non_zero_with_one_line(override, message, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", BENCH, "experiment=smoke", override, f"hydra.run.dir={run}"],
        cwd=REPO,
        env={**os.environ, "FUSION_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("fusion-bench: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # the job's folder holds the error for fusion-report, and no report
    assert message in json.loads((run / "error.json").read_text())["error"]
    assert not (run / "report.json").exists()


def test_a_size_question_on_data_whose_label_classes_name_no_mask_class_is_refused():
    from encoder_fusion.benchmarks.config.checks import build_datasets, check_vlm_probe
    from encoder_fusion.benchmarks.config.plan import llm_preset
    from encoder_fusion.benchmarks.tasks.vlm import VlmProbeOptions

    train, test = build_datasets(smoke_config())
    options = VlmProbeOptions(templates={"size": "how large is it ?"})
    check_vlm_probe(options, llm_preset("tiny"), train, test)  # synthetic: the shapes name both
    train.mask_classes = [f"region {i}" for i in range(len(train.mask_classes or []))]
    with pytest.raises(ValueError, match=r"no class of the data=synthetic labels names a mask class"):
        check_vlm_probe(options, llm_preset("tiny"), train, test)
