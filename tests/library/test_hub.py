"""FusedEncoder.save_pretrained / from_pretrained (huggingface_hub's mixin): the folder, the model card,
and the guarantees of load_trained kept. push_to_hub needs the Hub, which these machines cannot
reach: everything up to the upload is tested."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import perturb
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from vlm_cases import tiny_fused

from encoder_fusion import EncoderSpec, FusedEncoder, HookSpec
from encoder_fusion.encoders.tiny import tiny_spec


@pytest.fixture
def images():
    return torch.rand(2, 3, 61, 47, generator=torch.Generator().manual_seed(3))


def test_save_pretrained_round_trips_with_the_encoders_loaded_from_their_names(tmp_path, images):
    fused = tiny_fused(tmp_path, deepstack_layers={"dino": [3]})
    folder = tmp_path / "trained"
    fused.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    tensors = load_file(folder / "model.safetensors")
    assert tensors and all(key.startswith("head.") for key in tensors)  # the frozen encoders stay out
    config = json.loads((folder / "config.json").read_text())
    assert config["encoder_weights"] == {"clip": "pretrained", "dino": "pretrained"}
    loaded = FusedEncoder.from_pretrained(folder).eval()
    assert isinstance(loaded.encoders[0].spec, EncoderSpec)  # nested specs rebuilt into their types
    assert isinstance(loaded.encoders[0].spec.hooks, HookSpec)
    assert loaded.config == fused.config
    with torch.no_grad():
        expected, extras = fused.forward_deepstack(images)
        got, got_extras = loaded.forward_deepstack(images)
    assert torch.equal(got, expected) and all(torch.equal(a, b) for a, b in zip(got_extras, extras))


def test_the_model_card_names_encoders_hooks_strategy_tokens_and_the_verdict(tmp_path):
    fused = tiny_fused(tmp_path)
    fused.save_pretrained(
        tmp_path / "with", model_card_kwargs={"verdict": "gain: classification +3.1 pp [+1.2, +5.0]"}
    )
    card = (tmp_path / "with" / "README.md").read_text()
    assert "library_name: encoder-fusion" in card
    for expected in (
        "| clip | timm | `vit_base_patch16_clip_224.openai` |",
        "| [-2] | pretrained |",
        "| [1, 3] | pretrained |",
        "layer_merge: `weighted_ln`",
        "encoder_merge: `channel_concat`",
        "connector: `mlp`",
        f"Tokens per image: {fused.output_tokens()} at {fused.image_size[0]}x{fused.image_size[1]} pixels, "
        "each 32 wide.",
        "Benchmark verdict: gain: classification +3.1 pp [+1.2, +5.0]",
    ):
        assert expected in card
    fused.save_pretrained(tmp_path / "without")
    assert "No benchmark verdict was recorded" in (tmp_path / "without" / "README.md").read_text()


def test_from_pretrained_is_strict_and_checksummed(tmp_path):
    fused = tiny_fused(tmp_path)
    folder = tmp_path / "trained"
    fused.save_pretrained(folder)
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    key = next(iter(tensors))
    save_file({**tensors, key: tensors[key] + 1}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="differ from the sha256"):
        FusedEncoder.from_pretrained(folder)
    save_file({k: v for k, v in tensors.items() if k != key}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="missing"):
        FusedEncoder.from_pretrained(folder)


def test_a_file_of_another_config_is_refused(tmp_path):
    fused = tiny_fused(tmp_path)
    folder = tmp_path / "trained"
    fused.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "encoder_merge": "add"}))
    with pytest.raises(ValueError, match=r"encoder_merge"):
        FusedEncoder.from_pretrained(folder)


def test_folders_that_are_not_a_saved_fused_encoder_are_refused(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(
        ValueError,
        match=r"is not a saved FusedEncoder: its config.json has no 'encoders' \(it holds 'qwen2'\)",
    ):
        FusedEncoder.from_pretrained(tmp_path / "lm")
    fused = tiny_fused(tmp_path)
    fused.save_pretrained(tmp_path / "trained")
    (tmp_path / "trained" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no model.safetensors"):
        FusedEncoder.from_pretrained(tmp_path / "trained")


def test_encoders_saved_on_random_weights_warn_when_loaded(tmp_path):
    fused = FusedEncoder([tiny_spec("clip")], connector={"kind": "mlp", "out_dim": 8})
    perturb(fused.head)
    fused.save_pretrained(tmp_path / "random")
    with pytest.warns(UserWarning, match=r"encoder\(s\) clip were saved on random weights"):
        FusedEncoder.from_pretrained(tmp_path / "random")
