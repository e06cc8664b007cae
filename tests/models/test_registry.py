"""The registry's loaders refuse broken files with one error naming the file and what is wrong."""
from __future__ import annotations

import re

import pytest
import torch

import models


def checkpoint_of(net: torch.nn.Module, **changes) -> dict:
    """``net`` as training.train saves it, with ``changes`` applied (None removes a key)."""
    content = {"format": models.CHECKPOINT_FORMAT, "version": 1,
               "model": {"name": net.model_name, "args": net.model_args}, "state_dict": net.state_dict(),
               "config": {}}
    content.update(changes)
    return {key: value for key, value in content.items() if value is not None}


@pytest.fixture
def npr():
    torch.manual_seed(0)
    return models.build("npr")


@pytest.mark.parametrize("changes, message", [
    ({"state_dict": None}, "'state_dict' is unusable (it is missing)"),
    ({"model": None}, "'model' is unusable (it is missing)"),
    ({"model": {"name": "npr"}}, "'args' is unusable (it is missing)"),
    ({"model": "npr"}, "'model' is unusable (a str)"),
    ({"model": {"name": "nope", "args": {}}}, "cannot be built here (unknown model 'nope'"),
])
def test_a_checkpoint_missing_its_parts_names_the_file_and_the_key(npr, tmp_path, changes, message):
    path = tmp_path / "broken.pth"
    torch.save(checkpoint_of(npr, **changes), path)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{re.escape(message)}"):
        models.build_from_checkpoint(path)


def test_a_checkpoint_missing_weights_lists_them(npr, tmp_path):
    state = npr.state_dict()
    dropped = sorted(state)[0]
    del state[dropped]
    path = tmp_path / "partial.pth"
    torch.save(checkpoint_of(npr, state_dict=state), path)
    with pytest.raises(ValueError, match=f"{path}: weights do not fit model npr\n  missing \\(1\\): {dropped}"):
        models.build_from_checkpoint(path)


def test_nan_weights_are_refused_when_loaded(npr, tmp_path):
    state = npr.state_dict()
    poisoned = next(key for key, tensor in state.items() if tensor.is_floating_point())
    state[poisoned] = state[poisoned].clone()
    state[poisoned].view(-1)[0] = float("nan")
    ours, bare = tmp_path / "ours.pth", tmp_path / "bare.pth"
    torch.save(checkpoint_of(npr, state_dict=state), ours)
    torch.save(state, bare)
    for load in (lambda: models.build_from_checkpoint(ours), lambda: models.load_weights(models.build("npr"), bare)):
        with pytest.raises(ValueError, match=f"1 weight tensor\\(s\\) hold NaN or infinite values \\({poisoned}\\)"):
            load()


def test_an_intact_checkpoint_rebuilds_the_same_model(npr, tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(checkpoint_of(npr), path)
    model, content = models.build_from_checkpoint(path)
    assert model.model_name == "npr" and content["config"] == {}
    for key, tensor in npr.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
