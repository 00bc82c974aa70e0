import io
import json

import pytest
import torch

from pipeline.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    checkpoint_files,
    load_checkpoint,
    load_checkpoint_files,
    save_checkpoint,
)
from pipeline.model import ModelConfig, build_model


def small_trained_like_model():
    torch.manual_seed(0)
    model = build_model("tiny", width=8, channel_mults=(1, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def assert_same_function(a, b):
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x, torch.tensor([0.5])), b(x, torch.tensor([0.5])))


def test_files_round_trip_with_meta():
    model = small_trained_like_model()
    files = checkpoint_files(model, T=50, extra={"step": 7})
    assert set(files) == {WEIGHTS_FILE, CONFIG_FILE}
    meta = json.loads(files[CONFIG_FILE])
    assert meta["format_version"] == 1 and meta["T"] == 50 and meta["model_config"]["width"] == 8
    loaded, info = load_checkpoint_files(files)
    assert info["T"] == 50 and info["extra"] == {"step": 7} and info["model_config"] == model.config
    assert loaded.config == model.config
    assert_same_function(model, loaded)


def test_directory_round_trip(tmp_path):
    model = small_trained_like_model()
    save_checkpoint(tmp_path / "ckpt", model, T=20)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded, info = load_checkpoint(tmp_path / "ckpt", expect=model.config)
    assert info["T"] == 20
    assert_same_function(model, loaded)


def test_file_object_round_trip():
    model = small_trained_like_model()
    buffer = io.BytesIO()
    save_checkpoint(buffer, model, T=5)
    buffer.seek(0)
    loaded, info = load_checkpoint(buffer, expect=model.config.to_dict())
    assert info["T"] == 5
    assert_same_function(model, loaded)


def test_weights_that_do_not_fit_the_json_config_are_refused():
    files = checkpoint_files(small_trained_like_model(), T=10)
    meta = json.loads(files[CONFIG_FILE])
    meta["model_config"]["width"] = 16
    files[CONFIG_FILE] = json.dumps(meta).encode()
    with pytest.raises(CheckpointError, match="does not fit the config") as info:
        load_checkpoint_files(files)
    assert "\n" not in str(info.value)
    assert "shape mismatches" in str(info.value)


def test_unexpected_config_is_refused_before_loading_weights():
    files = checkpoint_files(small_trained_like_model(), T=10)
    files[WEIGHTS_FILE] = b"never read"
    with pytest.raises(CheckpointError, match=r"width=8 \(expected 16\)") as info:
        load_checkpoint_files(files, expect=ModelConfig(width=16, channel_mults=(1, 2)))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_or_malformed_files_are_refused(tmp_path):
    files = checkpoint_files(small_trained_like_model(), T=10)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint_files({WEIGHTS_FILE: files[WEIGHTS_FILE]})
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint_files({**files, CONFIG_FILE: b"{not json"})
    newer = json.loads(files[CONFIG_FILE]) | {"format_version": 99}
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint_files({**files, CONFIG_FILE: json.dumps(newer).encode()})
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)


class Payload:
    """Stands for arbitrary code hidden in a pickle."""


def test_weights_are_loaded_without_unpickling_objects():
    files = checkpoint_files(small_trained_like_model(), T=10)
    buffer = io.BytesIO()
    torch.save({"in_conv.weight": Payload()}, buffer)
    files[WEIGHTS_FILE] = buffer.getvalue()
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint_files(files)
