"""A missing extra is a one-line error naming the command that installs it from a checkout (sdt is on no
package index), not a traceback; missing Fashion-MNIST names the route without root."""
import re
import sys
from pathlib import Path

import pytest

from sdt.cli import main
from sdt.errors import MissingExtraError, require_extra

SRC = Path(__file__).resolve().parent.parent / "src" / "sdt"


def _one_line_error(capsys, command: str, extra: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sdt {command}: error: "), err
    assert f"pip install -e '.[{extra}]'" in err[0] and f"bash scripts/setup.sh {extra}" in err[0]
    return err[0]


def test_require_extra_names_the_module_and_the_checkout_install(monkeypatch):
    require_extra("json", "export", "anything")  # installed: nothing happens
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    with pytest.raises(MissingExtraError, match=re.escape("sdt export needs onnx, which is not installed")):
        require_extra("onnx", "export", "sdt export")


def test_export_without_onnx_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)
    out = tmp_path / "model.onnx"
    assert main(["export", "sdt_h_nano", "--output", str(out)]) == 2
    assert "needs onnx" in _one_line_error(capsys, "export", "export")
    assert list(tmp_path.iterdir()) == []


def test_export_check_without_onnxruntime(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", "sdt_h_nano", "--output", str(tmp_path / "model.onnx")]) == 2
    assert "needs onnxruntime" in _one_line_error(capsys, "export", "export")


def test_viz_of_a_scikit_image_sample_without_scikit_image(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "skimage", None)
    assert main(["viz", "--model", "sdt_h_nano", "--image", "astronaut", "--output", str(tmp_path / "viz")]) == 2
    assert "needs skimage" in _one_line_error(capsys, "viz", "viz")


def test_fid_without_torchmetrics(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    assert main(["fid", str(tmp_path / "samples.npz")]) == 2
    assert "needs torchmetrics" in _one_line_error(capsys, "fid", "fid")


def test_no_hint_names_a_package_index_install():
    """`pip install 'sdt[X]'` cannot work: sdt is installed from a checkout."""
    stale = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"sdt\[", line)]
    assert stale == []


def test_missing_fashion_mnist_says_the_route_without_root(tmp_path):
    from sdt.data import fashion_mnist
    from sdt.errors import DataError

    with pytest.raises(DataError) as error:
        fashion_mnist(str(tmp_path), "train", 100)
    message = str(error.value)
    assert "--data-dir" in message and "dpkg-deb -x" in message and "t10k-labels-idx1-ubyte" in message
