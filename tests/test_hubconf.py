"""hubconf.py: torch.hub.load(checkout, name, source="local") builds sdt's models from this checkout, takes
weights only from local files, and fails clearly for an unknown model, tag or file."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One fresh interpreter for every check (torch.hub imports hubconf.py itself, and sdt must not be imported
# before it): each check records its result or the error it raised.
SCRIPT = r"""
import json, sys
import torch
repo, weights = sys.argv[1], sys.argv[2]
out = {}

def check(key, fn):
    try:
        out[key] = fn()
    except Exception as err:
        out[key] = {"error": type(err).__name__, "message": str(err)}

def load(name, **kwargs):
    return torch.hub.load(repo, name, source="local", **kwargs)

def tiny():
    model = load("sdt_h_tiny", num_classes=7)
    return [type(model).__name__, model.num_classes, list(model(torch.randn(1, 3, 64, 48)).shape)]

check("tiny", tiny)
out["sdt_file"] = sys.modules["sdt"].__file__

def entry_points():
    import importlib.util, timm
    spec = importlib.util.spec_from_file_location("hubconf", repo + "/hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    names = sorted(n for n in dir(hubconf) if not n.startswith("_") and callable(getattr(hubconf, n)))
    from_sdt = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("sdt."))
    return {"names": names, "from_sdt": from_sdt, "dependencies": hubconf.dependencies}

check("entry_points", entry_points)

def shipped():
    import safetensors.torch, timm
    model = load("sdt_h_nano", pretrained=True, tag="fmnist_e30")
    file = timm.models.get_pretrained_cfg("sdt_h_nano.fmnist_e30").file
    expected = safetensors.torch.load_file(file)
    state = model.state_dict()
    same = all(torch.equal(state[k], v) for k, v in expected.items() if k in state)
    return {"classes": model.num_classes, "in_chans": model.pretrained_cfg["input_size"][0],
            "same": same, "matched": sum(k in state for k in expected), "total": len(expected)}

check("shipped", shipped)

def from_file():
    model = load("rmt_nano", checkpoint_path=weights)
    import safetensors.torch
    expected = safetensors.torch.load_file(weights)
    state = model.state_dict()
    return {"classes": model.num_classes, "in_chans": model.pretrained_cfg["input_size"][0],
            "same": all(torch.equal(state[k], v) for k, v in expected.items())}

check("from_file", from_file)
check("unknown_model", lambda: load("sdt_h_tnyi"))
check("no_shipped_weights", lambda: load("sdt_h_tiny", pretrained=True))
check("untagged_pretrained", lambda: load("sdt_h_nano", pretrained=True))
check("unknown_tag", lambda: load("sdt_h_nano", pretrained=True, tag="imagenet"))
check("missing_file", lambda: load("sdt_h_tiny", checkpoint_path=weights + ".missing"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    import safetensors.torch
    import timm

    import sdt  # noqa: F401

    weights = tmp_path_factory.mktemp("hub") / "rmt_nano_3cls_1ch.safetensors"
    model = timm.create_model("rmt_nano", num_classes=3, in_chans=1)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    # from an empty folder, so that nothing but hubconf.py can put this checkout's sdt on the path
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO), str(weights)], cwd=weights.parent,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_hub_load_builds_a_model_from_this_checkout(hub: dict):
    assert hub["tiny"] == ["SpatialDecayTransformer", 7, [1, 7]]
    assert Path(hub["sdt_file"]) == REPO / "src" / "sdt" / "__init__.py"


def test_there_is_an_entry_point_for_every_model_sdt_registers(hub: dict):
    points = hub["entry_points"]
    assert points["names"] == points["from_sdt"]
    assert {"sdt_h_tiny", "sdt_h_nano_full2d", "rmt_large", "sdt_vit_fm_tiny"} <= set(points["names"])
    assert {"torch", "timm"} <= set(points["dependencies"])


def test_pretrained_takes_the_weights_shipped_with_sdt(hub: dict):
    shipped = hub["shipped"]
    assert shipped["classes"] == 10 and shipped["in_chans"] == 1
    assert shipped["same"] and shipped["matched"] == shipped["total"] > 0


def test_checkpoint_path_loads_a_local_file_with_its_classes_and_channels(hub: dict):
    assert hub["from_file"] == {"classes": 3, "in_chans": 1, "same": True}


def test_clear_errors(hub: dict):
    assert hub["unknown_model"] == {"error": "RuntimeError", "message": "Cannot find callable sdt_h_tnyi in hubconf"}
    no_weights = hub["no_shipped_weights"]
    assert no_weights["error"] == "ValueError"
    assert no_weights["message"] == ("sdt_h_tiny has no weights shipped with sdt (and torch.hub.load of sdt never "
                                     "downloads): pass checkpoint_path=FILE")
    untagged = hub["untagged_pretrained"]
    assert untagged["error"] == "ValueError" and "pass tag= one of ['fmnist', 'fmnist_e30']" in untagged["message"]
    assert hub["unknown_tag"] == {"error": "ValueError", "message": "sdt_h_nano has no tag 'imagenet'; tags with "
                                                                   "shipped weights: ['fmnist', 'fmnist_e30']"}
    missing = hub["missing_file"]
    assert missing["error"] == "FileNotFoundError" and missing["message"].startswith("checkpoint_path: no such file: ")
