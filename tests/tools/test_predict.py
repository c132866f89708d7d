"""sdt predict: a shipped tag, a run folder, a hub folder and a weights file with --arch, each with the
model's own preprocessing; unreadable images are reported by name while the others are predicted."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import sdt  # noqa: F401  (registers the models)
from sdt.cli import main
from sdt.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from sdt.tools.predict import load_predictor, predict_images

TAG = "sdt_h_nano.fmnist_e30"


def _grey_images(folder, count=3, size=28):
    """Grey PNGs with a bright band at a different height each."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 60, size=(size, size))
        pixels[3 * i:3 * i + 8, :] += 150
        path = folder / f"image{i}.png"
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


def _reference_probabilities(model, path):
    """The shipped model on the image, preprocessed by hand: 28x28 grey, /255, Fashion-MNIST mean/std."""
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255
    x = (torch.from_numpy(pixels) - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    with torch.no_grad():
        return model.eval()(x[None, None]).softmax(-1)[0]


def test_a_shipped_tag_predicts_with_its_preprocessing_and_fashion_mnist_names(tmp_path, capsys):
    paths = _grey_images(tmp_path)
    model = timm.create_model(TAG, pretrained=True)
    assert main(["predict", *map(str, paths), "--model", TAG, "--topk", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == list(map(str, paths))
    for result, path in zip(results, paths):
        expected = _reference_probabilities(model, path).topk(3)
        assert [p["index"] for p in result["predictions"]] == expected.indices.tolist()
        assert [p["label"] for p in result["predictions"]] == [FASHION_MNIST_CLASSES[i] for i in expected.indices]
        np.testing.assert_allclose([p["probability"] for p in result["predictions"]], expected.values, rtol=1e-5)

    assert main(["predict", str(paths[0]), "--model", TAG, "--topk", "2"]) == 0
    text = capsys.readouterr().out.splitlines()
    top = results[0]["predictions"]
    assert text[0] == str(paths[0]) and len(text) == 3
    assert text[1].split() == [*top[0]["label"].split(), f"{top[0]['probability']:.4f}"]


def test_an_rgb_image_of_another_size_becomes_the_models_grey_input(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 56, 3)).astype(np.uint8)).save(path)
    (result,) = predict_images(load_predictor(TAG), [str(path)], topk=10)
    assert len(result["predictions"]) == 10 and sum(p["probability"] for p in result["predictions"]) == pytest.approx(1, abs=1e-5)


def test_a_weights_file_with_arch_matches_the_shipped_tag(tmp_path):
    paths = list(map(str, _grey_images(tmp_path)))
    weights = timm.models.get_pretrained_cfg(TAG).file
    by_tag = predict_images(load_predictor(TAG), paths, topk=3)
    by_file = predict_images(load_predictor(weights, arch=TAG), paths, topk=3)
    assert by_file == by_tag
    # a plain architecture: head and channels from the file, size from the architecture's cfg, unnamed classes
    predictor = load_predictor(weights, arch="sdt_h_nano")
    assert predictor.model.num_classes == 10 and predictor.data_config["input_size"] == (1, 64, 64)
    assert len(predictor.data_config["mean"]) == 1
    plain = predict_images(predictor, paths, topk=3)
    assert plain[0]["predictions"][0]["label"].startswith("class_")


def test_a_weights_file_without_arch_is_a_one_line_error(tmp_path, capsys):
    image = _grey_images(tmp_path, 1)[0]
    weights = timm.models.get_pretrained_cfg(TAG).file
    assert main(["predict", str(image), "--model", weights]) == 2
    assert "--arch" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["predict", str(image), "--model", str(tmp_path / "nothing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_bad_images_are_named_and_the_others_still_predicted(tmp_path, capsys):
    good = _grey_images(tmp_path, 2)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing a decoder can read")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    missing = tmp_path / "missing.png"
    images = [good[0], empty, corrupt, folder, missing, good[1]]
    assert main(["predict", *map(str, images), "--model", TAG, "--json"]) == 1
    out, err = capsys.readouterr()
    results = json.loads(out)
    assert [r["image"] for r in results] == list(map(str, images))
    assert "predictions" in results[0] and "predictions" in results[-1]
    errors = err.strip().splitlines()
    assert len(errors) == 4
    for line, path, why in zip(errors, (empty, corrupt, folder, missing),
                               ("empty file", "not a readable image", "is a folder", "no such file")):
        assert line.startswith(f"sdt predict: error: {path}: {why}")
        assert "Traceback" not in line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from conftest import tiny_overrides, write_fake_fashion_mnist

    root = tmp_path_factory.mktemp("predict_run")
    data = write_fake_fashion_mnist(root / "fmnist")
    run = root / "run"
    overrides = tiny_overrides(data, **{"engine.epochs": "1", "data.crop_pct": "0.875"})
    assert main(["train", "--recipe", "quick", "--output", str(run)] + [a for o in overrides for a in ("-o", o)]) == 0
    return run


def test_a_run_folder_uses_its_eval_transform_and_a_hub_folder_gives_the_same(finished_run, tmp_path):
    from sdt.data import build_transform
    from sdt.engine import load_config
    from sdt.files import load_weights
    from sdt.tasks.classify import TrainConfig, create_model
    from sdt.tools.hub import export_run_to_hub

    paths = list(map(str, _grey_images(tmp_path)))
    by_run = predict_images(load_predictor(str(finished_run)), paths, topk=10)
    cfg = load_config(TrainConfig, str(finished_run / "config.yaml"))
    model = create_model(cfg.model, cfg.model.num_classes, cfg.model.in_chans).eval()
    model.load_state_dict(load_weights(finished_run / "best.safetensors"))
    transform = build_transform(cfg.data, None, cfg.model.in_chans)  # 16 px after a 0.875 crop
    for result, path in zip(by_run, paths):
        with torch.no_grad():
            expected = model(transform(Image.open(path).convert("L"))[None]).softmax(-1)[0]
        got = torch.zeros(10)
        for p in result["predictions"]:
            got[p["index"]] = p["probability"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert {p["label"] for p in result["predictions"]} == set(FASHION_MNIST_CLASSES)

    hub = export_run_to_hub(finished_run, tmp_path / "hub")
    by_hub = predict_images(load_predictor(str(hub)), paths, topk=10)
    for a, b in zip(by_run, by_hub):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in a["predictions"]],
                                   [p["probability"] for p in b["predictions"]], rtol=1e-5)
