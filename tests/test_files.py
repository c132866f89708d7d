"""sdt.files and sdt.engine.checkpoints: atomic writes, safe and checked loading of weights, checkpoint folders."""
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sdt.engine.checkpoints import checkpoint_dirs, load_train_state, remove_temp_checkpoints, write_checkpoint
from sdt.errors import CheckpointError
from sdt.files import atomic_path, atomic_write, load_into, load_weights, save_weights
from sdt.errors import SdtError


def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path: Path):
    path = tmp_path / "a.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(path) as tmp:
            assert tmp.suffix == ".json" and tmp.parent == tmp_path
            tmp.write_text("partial")
            raise RuntimeError("writer failed")
    assert path.read_text() == "new"  # a failed write leaves the old file, and no temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_weights_round_trip_from_safetensors_and_torch_files(tmp_path: Path):
    model = nn.Linear(3, 2)
    save_weights(tmp_path / "w.safetensors", model.state_dict(), {"epoch": "3"})
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "w.pth")  # a training-script wrapper
    for name in ("w.safetensors", "w.pth"):
        loaded = load_weights(tmp_path / name)
        assert loaded.keys() == model.state_dict().keys()
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
        fresh = nn.Linear(3, 2)
        load_into(fresh, loaded, tmp_path / name)
        assert torch.equal(fresh.weight, model.weight)


def test_bad_weight_files_are_checkpoint_errors_naming_the_file(tmp_path: Path):
    save_weights(tmp_path / "good.safetensors", {"w": torch.zeros(100)})
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.safetensors").write_text("hello, not weights")
    torch.save({"w": torch.zeros(3)}, tmp_path / "torch-file.safetensors")  # a torch file under the wrong name
    for name in ("cut.safetensors", "text.safetensors", "torch-file.safetensors"):
        with pytest.raises(CheckpointError, match=rf"{name} is not a readable safetensors file.*Copy or download"):
            load_weights(tmp_path / name)
    torch.save({"w": torch.zeros(1000)}, tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cut.pth is not a readable PyTorch checkpoint"):
        load_weights(tmp_path / "cut.pth")
    torch.save({"w": torch.zeros(3), "note": "text"}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match=r"mixed.pth is not a state dict: 1 entries are not tensors \(e.g. \['note'\]\)"):
        load_weights(tmp_path / "mixed.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_weights(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="missing.safetensors does not exist"):
        load_weights(tmp_path / "missing.safetensors")
    assert issubclass(CheckpointError, SdtError)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"w": _RunsCode()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="evil.pth is not a readable PyTorch checkpoint"):
        load_weights(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_load_into_names_missing_unexpected_and_wrongly_shaped_keys(tmp_path: Path):
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4))
    state = {"0.weight": torch.zeros(2, 3), "0.bias": torch.zeros(5), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        load_into(model, state, tmp_path / "w.safetensors")
    message = str(info.value)
    assert "w.safetensors does not fit this model (Sequential)" in message
    assert "2 missing keys ['1.weight', '1.bias']" in message and "1 unexpected keys ['extra']" in message
    assert "1 shape mismatches (file vs model) ['0.bias (5,) vs (2,)']" in message


def test_checkpoint_folders_are_written_whole_and_orphans_removed(tmp_path: Path):
    folder = write_checkpoint(tmp_path, 7, {"model": {"w": torch.ones(2)}}, {"epoch": 1})
    assert folder.name == "step-00000007" and checkpoint_dirs(tmp_path) == [folder]
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "state.pt"]
    assert load_train_state(folder)["epoch"] == 1
    assert torch.equal(load_weights(folder / "model.safetensors")["w"], torch.ones(2))
    orphan = tmp_path / "checkpoints" / ".tmp-step-00000009-123"  # what a kill during a save leaves
    orphan.mkdir()
    save_file({"w": torch.zeros(1000)}, str(orphan / "model.safetensors"))
    assert checkpoint_dirs(tmp_path) == [folder]
    assert remove_temp_checkpoints(tmp_path) == [orphan]
    assert not orphan.exists() and folder.is_dir()
