"""Dense prediction (issue 19): sdt backbones under torchvision's detectors and a Semantic-FPN head,
the Fashion-MNIST mosaic benchmark, the detection / segmentation runs on the shared engine, and
bad input. Small canvases and narrow heads keep the default part fast."""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from sdt import rmt_config_to_kwargs
from sdt.engine.checkpoints import checkpoint_dirs
from sdt.errors import CheckpointError
from sdt.files import load_weights
from sdt.engine import load_config
from sdt.errors import ConfigError
from sdt.errors import DataError
from sdt.models.dense import (DETECTORS, SegmentationModel, create_backbone, create_detector, create_segmenter,
                       load_backbone_weights)
from sdt.cli import add_dense_parsers, main
from sdt.tasks.detect import Detect, DetectConfig
from sdt.tasks.segment import Segment, SegmentConfig
from sdt.data.mosaic import (IGNORE_INDEX, FashionMosaics, MosaicConfig, check_detection_target, check_semantic_target)

RMT_FIXTURE = Path(__file__).parents[1] / "fixtures" / "rmt"  # weights and logits from RMT's released code
SMALL = {"stem_stride": 4}
# fewer sampled anchors / proposals than torchvision's defaults: the same code paths, a fraction of the work
LIGHT_RCNN = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_test=30, rpn_batch_size_per_image=32, box_batch_size_per_image=32, box_head_dim=32)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _targets(n_images: int, size: int, masks: bool = False):
    targets = []
    for i in range(n_images):
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [34.0, 20.0, 60.0, 58.0]])
        t = {"boxes": boxes, "labels": torch.tensor([1 + i, 10])}
        if masks:
            m = torch.zeros(2, size, size, dtype=torch.uint8)
            m[0, 6:40, 4:30] = 1
            m[1, 20:58, 34:60] = 1
            t["masks"] = m
        targets.append(t)
    return targets


# ---------------------------------------------------------------------------------------------
# Backbones and detectors


@pytest.mark.parametrize("name", ["sdt_h_nano", "rmt_nano"])
@pytest.mark.parametrize("kind", DETECTORS)
def test_each_torchvision_detector_trains_and_predicts_on_the_backbone(name, kind):
    torch.manual_seed(0)
    width = 32 if kind == "fcos" else 16  # FCOS's head has GroupNorm(32)
    backbone = create_backbone(name, in_chans=1, fpn_channels=width, model_kwargs=SMALL)
    assert backbone.out_channels == width and backbone.strides == [4, 8, 16, 32, 64]
    kwargs = LIGHT_RCNN if kind in ("fasterrcnn", "maskrcnn") else {}
    model = create_detector(kind, backbone, num_classes=11, canvas=64, **kwargs)
    if kind in ("fasterrcnn", "maskrcnn"):
        assert model.roi_heads.box_predictor.cls_score.out_features == 11
        assert model.roi_heads.box_head.fc7.out_features == 32
    if kind == "maskrcnn":
        assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 11
    images = [torch.rand(1, 64, 64) for _ in range(2)]
    model.train()
    losses = model(images, _targets(2, 64, masks=kind == "maskrcnn"))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    first = next(backbone.body.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0  # gradients reach the stem
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and {"boxes", "labels", "scores"} <= set(out[0])
    assert out[0]["boxes"].shape[1:] == (4,)
    if kind == "maskrcnn":
        assert out[0]["masks"].shape[1:] == (1, 64, 64)


@pytest.mark.parametrize("kind", DETECTORS)
def test_bf16_autocast_trains_and_predicts_boxes_at_float32_precision(kind):
    # bf16's 8-bit mantissa makes every value in [128, 256) a whole number: boxes decoded in bf16
    # would sit on a 1-pixel grid there (a multiple of 4 px on COCO-sized images)
    torch.manual_seed(0)
    canvas = 256
    backbone = create_backbone("sdt_h_nano", in_chans=1, fpn_channels=32, model_kwargs=SMALL)
    kwargs = LIGHT_RCNN if kind in ("fasterrcnn", "maskrcnn") else {"score_thresh": 0.0}
    model = create_detector(kind, backbone, num_classes=11, canvas=canvas, **kwargs)
    images = [torch.rand(1, canvas, canvas)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, _targets(1, canvas, masks=kind == "maskrcnn"))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    boxes = torch.cat([o["boxes"] for o in out])
    assert boxes.dtype == torch.float32 and out[0]["scores"].dtype == torch.float32
    upper = boxes[(boxes >= 128) & (boxes < 256)]
    assert upper.numel() >= 20, upper.numel()
    off_grid = (upper != upper.round()).float().mean()
    assert off_grid > 0.5, f"{off_grid:.2f} of the box coordinates in [128, 256) px are not whole pixels"


def test_full2d_backbone_and_torchvision_resnet_fpn_give_the_same_maps():
    for name, kwargs in (("sdt_h_nano_full2d", SMALL), ("tv_resnet18", None)):
        backbone = create_backbone(name, in_chans=1, fpn_channels=16, model_kwargs=kwargs)
        maps = backbone(torch.rand(1, 1, 64, 64))
        assert list(maps) == ["0", "1", "2", "3", "pool"]
        assert [tuple(m.shape[-2:]) for m in maps.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
        assert all(m.shape[1] == 16 for m in maps.values())


def test_nhwc_features_are_permuted_exactly():
    backbone = create_backbone("sdt_h_nano", in_chans=1, fpn_channels=8, out_indices=(1, 2), model_kwargs=SMALL).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        nhwc = backbone.body(x)
        expected = backbone.fpn({"0": nhwc[0].permute(0, 3, 1, 2), "1": nhwc[1].permute(0, 3, 1, 2)})
        got = backbone(x)
    assert backbone.strides == [8, 16, 32]
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_input_not_a_multiple_of_the_stride_is_a_clear_error():
    backbone = create_backbone("rmt_nano", in_chans=1, fpn_channels=8, model_kwargs=SMALL)
    with pytest.raises(DataError, match=r"100x100 is not a multiple of the backbone's stride 32.*128x128"):
        backbone(torch.rand(1, 1, 100, 100))
    with pytest.raises(ConfigError, match="canvas 100 must be a positive multiple of the backbone's stride 32"):
        create_detector("retinanet", backbone, 11, canvas=100)
    with pytest.raises(ConfigError, match="unknown detector 'yolo'"):
        create_detector("yolo", backbone, 11, canvas=64)
    with pytest.raises(ConfigError, match=r"fpn_channels=8\) must be a multiple of 32"):
        create_detector("fcos", backbone, 11, canvas=64)
    with pytest.raises(ConfigError, match="count the background"):
        create_detector("fcos", backbone, 1, canvas=64)
    with pytest.raises(ConfigError, match="unknown backbone 'sdt_h_nanoo'; did you mean sdt_h_nano"):
        create_backbone("sdt_h_nanoo")
    with pytest.raises(ConfigError, match=r"tv_resnet18 \(torchvision's ResNet\) takes none.*model.kwargs=\{\}"):
        create_backbone("tv_resnet18", model_kwargs={"stem_stride": 4})


def test_frozen_stages_and_norm_eval():
    backbone = create_backbone("sdt_h_nano", in_chans=1, fpn_channels=8, frozen_stages=1, norm_eval=True, model_kwargs=SMALL)
    body = backbone.body
    assert not any(p.requires_grad for p in body.stem.parameters())
    assert not any(p.requires_grad for p in body.stages_0.parameters())
    assert all(p.requires_grad for n, p in body.stages_1.named_parameters() if "norm" not in n)
    backbone.train()
    assert not body.stem.training and not body.stages_0.training and body.stages_1.training
    norms = [m for m in body.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm))]
    assert norms and all(not m.training for m in norms)
    assert all(not p.requires_grad for m in norms for p in m.parameters())
    before = {k: v.clone() for k, v in body.state_dict().items() if "running" in k}
    backbone(torch.rand(2, 1, 64, 64))  # train mode: BatchNorm statistics must not move
    assert all(torch.equal(before[k], body.state_dict()[k]) for k in before)
    with pytest.raises(ConfigError, match="frozen_stages=5, but the backbone has 4 stages"):
        create_backbone("sdt_h_nano", in_chans=1, frozen_stages=5)
    resnet = create_backbone("tv_resnet18", in_chans=1, fpn_channels=8, frozen_stages=2)
    body = resnet.fpn_backbone.body
    assert not any(p.requires_grad for p in body.layer2.parameters()) and all(p.requires_grad for p in body.layer3.parameters())


def test_pretrained_classifier_weights_load_into_the_backbone_without_the_head(tmp_path: Path):
    torch.manual_seed(1)
    classifier = timm.create_model("sdt_h_nano", in_chans=1, num_classes=10, **SMALL).eval()
    path = tmp_path / "cls.safetensors"
    save_file(classifier.state_dict(), str(path))
    backbone = create_backbone("sdt_h_nano", in_chans=1, fpn_channels=8, pretrained=str(path), model_kwargs=SMALL)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        expected = classifier.forward_intermediates(x, intermediates_only=True)
        got = backbone.body.eval()(x)
    assert all(torch.allclose(a, b.permute(0, 3, 1, 2), atol=1e-6) for a, b in zip(expected, got))
    # weights of another model, or with another input width, are refused by name
    with pytest.raises(CheckpointError, match="does not fit the rmt_nano backbone"):
        other = timm.create_model("resnet18", in_chans=1)
        save_file(other.state_dict(), str(tmp_path / "resnet.safetensors"))
        create_backbone("rmt_nano", in_chans=1, pretrained=str(tmp_path / "resnet.safetensors"), model_kwargs=SMALL)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        create_backbone("sdt_h_nano", in_chans=3, pretrained=str(path), model_kwargs=SMALL)
    (tmp_path / "bad.safetensors").write_bytes(b"not a weights file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        create_backbone("sdt_h_nano", pretrained=str(tmp_path / "bad.safetensors"))


def test_rmt_released_checkpoint_loads_into_an_rmt_backbone():
    config = json.loads((RMT_FIXTURE / "rmt_small.json").read_text())["constructor_kwargs"]
    kwargs = {k: v for k, v in rmt_config_to_kwargs(config).items() if k not in ("in_chans", "num_classes")}
    path = str(RMT_FIXTURE / "rmt_small.safetensors")
    backbone = create_backbone("rmt_small", in_chans=3, fpn_channels=8, pretrained=path, model_kwargs=kwargs).eval()
    reference = timm.create_model("rmt_small", in_chans=3, num_classes=10, **kwargs).eval()
    from sdt.models import checkpoint_filter_fn

    reference.load_state_dict(checkpoint_filter_fn(load_weights(path), reference))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
        got = backbone.body(x)
    assert all(torch.allclose(a, b.permute(0, 3, 1, 2), atol=1e-5) for a, b in zip(expected, got))
    counts = load_backbone_weights(create_backbone("rmt_small", in_chans=3, model_kwargs=kwargs).body, "rmt_small",
                                   path, 3, kwargs)
    assert counts["dropped"] > 0  # the head (proj, norm, fc)


def test_segmentation_model_forward_backward():
    for name in ("sdt_h_nano", "rmt_nano"):
        model = create_segmenter(create_backbone(name, in_chans=1, fpn_channels=16, extra_blocks="none",
                                                 model_kwargs=SMALL), num_classes=11, head_channels=16)
        assert isinstance(model, SegmentationModel)
        logits = model(torch.rand(2, 1, 64, 64))
        assert logits.shape == (2, 11, 64, 64)
        torch.nn.functional.cross_entropy(logits, torch.randint(0, 11, (2, 64, 64))).backward()
        assert next(model.backbone.body.parameters()).grad.abs().sum() > 0
        with pytest.raises(DataError, match=r"expected images \(B, 1, H, W\)"):
            model(torch.rand(2, 3, 64, 64))


# ---------------------------------------------------------------------------------------------
# Mosaics


def _mosaic_cfg(data_dir: Path, **kw) -> MosaicConfig:
    values = dict(canvas=64, min_items=1, max_items=3, min_side=16, max_side=32, train_images=12, val_images=4,
                  test_images=4, data_dir=str(data_dir), val_size=50)
    values.update(kw)
    return MosaicConfig(**values)


def test_mosaics_are_deterministic_and_depend_on_seed_split_and_index(fake_fmnist: Path):
    cfg = _mosaic_cfg(fake_fmnist)
    a, b = FashionMosaics(cfg, "train"), FashionMosaics(cfg, "train")
    for i in range(4):
        sa, sb = a.sample(i), b.sample(i)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(a.sample(0)["image"], a.sample(1)["image"])
    assert not torch.equal(a.sample(0)["image"], FashionMosaics(cfg, "val").sample(0)["image"])
    other_seed = FashionMosaics(MosaicConfig(**{**cfg.__dict__, "seed": 1}), "train")
    assert not torch.equal(a.sample(0)["image"], other_seed.sample(0)["image"])
    # the same mosaics through DataLoader workers (generated in other processes)
    loader = torch.utils.data.DataLoader(a, batch_size=4, num_workers=2)
    images, indices = next(iter(loader))
    assert indices.tolist() == [0, 1, 2, 3]
    assert all(torch.equal(images[i], a.sample(i)["image"]) for i in range(4))
    with pytest.raises(IndexError):
        a.sample(12)


def test_mosaic_targets_come_from_the_items_pixels(fake_fmnist: Path):
    cfg = _mosaic_cfg(fake_fmnist, max_items=5, train_images=30)
    ds = FashionMosaics(cfg, "train")
    for i in range(len(ds)):
        s = ds.sample(i)
        n = len(s["boxes"])
        assert 1 <= n <= 5
        check_detection_target(s, (64, 64), ds.num_classes, need_masks=True)
        check_semantic_target(s["semantic"], (64, 64), ds.num_classes)
        assert s["masks"].shape == (n, 64, 64) and int(s["masks"].sum(0).max()) <= 1  # disjoint (occlusion)
        assert torch.equal(s["labels"], torch.from_numpy(ds.labels[s["items"].numpy()]) + 1)
        semantic = torch.zeros(64, 64, dtype=torch.long)
        for k in range(n):
            m = s["masks"][k].bool()
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert s["boxes"][k].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            semantic[m] = s["labels"][k]
            # a mask pixel is brighter than threshold x the item's maximum, which is at most 1
            assert (s["image"][0][m] > 0).all()
        assert torch.equal(semantic, s["semantic"])
    # test mosaics are made only of Fashion-MNIST test items
    test = FashionMosaics(cfg, "test")
    assert len(test.images) == 60 and test.sample(0)["items"].max() < 60


def test_single_item_mask_is_the_thresholded_item(fake_fmnist: Path):
    import numpy as np
    from PIL import Image

    cfg = _mosaic_cfg(fake_fmnist, max_items=1, min_side=28, max_side=28, threshold=0.5)
    s = FashionMosaics(cfg, "train").sample(0)
    item = FashionMosaics(cfg, "train").images[s["items"][0]]
    pixels = np.asarray(Image.fromarray(item).resize((28, 28), Image.BILINEAR), dtype=np.float32) / 255
    assert int(s["masks"][0].sum()) == int((pixels > 0.5 * pixels.max()).sum())


@pytest.mark.parametrize("change, message", [
    (dict(max_side=80), "data.max_side must be <= data.canvas"),
    (dict(min_items=0), "data.min_items must be at least 1"),
    (dict(threshold=1.5), "data.threshold must be in"),
    (dict(max_overlap=1.0), "data.max_overlap must be in"),
])
def test_bad_mosaic_config_is_a_data_error(fake_fmnist: Path, change, message):
    with pytest.raises(DataError, match=message):
        FashionMosaics(_mosaic_cfg(fake_fmnist, **change), "train")


@pytest.mark.parametrize("target, message", [
    ({"boxes": torch.tensor([[10.0, 10, 10, 20]]), "labels": torch.tensor([1])}, "box 0 .* is degenerate"),
    ({"boxes": torch.tensor([[10.0, 30, 20, 20]]), "labels": torch.tensor([1])}, "is degenerate"),
    ({"boxes": torch.tensor([[10.0, 10, 70, 20]]), "labels": torch.tensor([1])}, "leaves the 64x64 image"),
    ({"boxes": torch.tensor([[1.0, 1, 5, 5]]), "labels": torch.tensor([11])}, r"labels must be integers in \[1, 10\]"),
    ({"boxes": torch.tensor([[1.0, 1, 5, 5]]), "labels": torch.tensor([0])}, "0 is the background"),
    ({"boxes": torch.tensor([[1.0, 1, 5, 5]]), "labels": torch.tensor([1, 2])}, "1 boxes but labels of shape"),
    ({"boxes": torch.tensor([1.0, 1, 5, 5]), "labels": torch.tensor([1])}, r"boxes must be \(N, 4\)"),
    ({"boxes": torch.tensor([[1.0, 1, 5, 5]]), "labels": torch.tensor([1]),
      "masks": torch.zeros(1, 32, 32, dtype=torch.uint8)}, r"masks have shape \(1, 32, 32\) but the image is 64x64"),
])
def test_bad_detection_targets_are_clear_errors(target, message):
    with pytest.raises(DataError, match=message):
        check_detection_target(target, (64, 64), 11, where="mosaic 3", need_masks="masks" in target)


def test_bad_semantic_maps_are_clear_errors():
    check_semantic_target(torch.full((64, 64), IGNORE_INDEX), (64, 64), 11)  # ignored pixels are fine
    with pytest.raises(DataError, match="semantic map has shape"):
        check_semantic_target(torch.zeros(32, 64, dtype=torch.long), (64, 64), 11)
    with pytest.raises(DataError, match=r"class ids must be in \[0, 11\) or 255.*\[11\]"):
        check_semantic_target(torch.full((64, 64), 11), (64, 64), 11)
    with pytest.raises(DataError, match="integer class ids"):
        check_semantic_target(torch.zeros(64, 64), (64, 64), 11)


def test_an_image_without_boxes_trains_as_background():
    # documented behaviour (sdt.data.check_detection_target): no boxes = a background-only image
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    check_detection_target(empty, (64, 64), 11)
    for kind in ("fasterrcnn", "fcos"):
        model = create_detector(kind, create_backbone("rmt_nano", in_chans=1, fpn_channels=32, model_kwargs=SMALL), 11, 64,
                                **(LIGHT_RCNN if kind == "fasterrcnn" else {}))
        losses = model([torch.rand(1, 64, 64), torch.rand(1, 64, 64)], [empty, empty])
        assert torch.isfinite(sum(losses.values()))


# ---------------------------------------------------------------------------------------------
# Runs on the engine


def _run_overrides(data_dir: Path, **extra) -> list:
    values = {"data.canvas": 64, "data.min_side": 16, "data.max_side": 32, "data.train_images": 12, "data.val_images": 4,
              "data.test_images": 4, "data.data_dir": str(data_dir), "data.val_size": 50, "data.workers": 0,
              "model.fpn_channels": 16, "engine.epochs": 1, "engine.batch_size": 4, "engine.threads": 1,
              "engine.ckpt_every_steps": 1, "engine.keep_checkpoints": 10, "engine.log_every_steps": 1,
              "engine.warmup_epochs": 0}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _final_weights(run: Path):
    return load_weights(checkpoint_dirs(run)[-1] / "model.safetensors")


def _resume_from_first_checkpoint(reference: Path, resumed: Path, run) -> None:
    shutil.copytree(reference, resumed)
    for later in checkpoint_dirs(resumed)[1:]:  # back to step 1 of 3, as if killed there
        shutil.rmtree(later)
    for name in ("best.safetensors", "summary.json", "report.md"):
        (resumed / name).unlink()
    run(None, str(resumed), "auto")
    a, b = _final_weights(reference), _final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_detection_run_writes_a_run_folder_resumes_exactly_and_scores_map(fake_fmnist: Path, tmp_path: Path):
    overrides = _run_overrides(fake_fmnist, **{"model.detector": "fasterrcnn",
                                               "model.detector_kwargs": json.dumps(LIGHT_RCNN)})
    cfg = load_config(DetectConfig, "detect-mosaic", overrides)
    run = tmp_path / "det"
    summary = Detect().train(cfg, str(run))
    for name in ("config.yaml", "metrics.jsonl", "best.safetensors", "summary.json", "report.md", "curves.png", "samples.png"):
        assert (run / name).is_file(), name
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000001", "step-00000002", "step-00000003"]
    assert 0 <= summary["test"]["map"] <= 100 and "map_50" in summary["test"]
    assert json.loads((run / "summary.json").read_text())["test"] == summary["test"]
    assert "box mAP" in (run / "report.md").read_text()
    _resume_from_first_checkpoint(run, tmp_path / "resumed", Detect().train)


def test_segmentation_run_resumes_exactly_and_scores_miou(fake_fmnist: Path, tmp_path: Path):
    cfg = load_config(SegmentConfig, "segment-mosaic", _run_overrides(fake_fmnist, **{"model.head_channels": 16}))
    run = tmp_path / "seg"
    summary = Segment().train(cfg, str(run))
    assert 0 <= summary["test"]["miou"] <= 100 and "iou_trouser" in summary["test"]
    assert (run / "samples.png").is_file() and "mIoU" in (run / "report.md").read_text()
    _resume_from_first_checkpoint(run, tmp_path / "resumed", Segment().train)


def test_miou_of_a_perfect_and_an_empty_prediction(fake_fmnist: Path):
    from sdt.engine import DistInfo, eval_loader

    ds = FashionMosaics(_mosaic_cfg(fake_fmnist, val_images=4), "val")

    class Oracle(torch.nn.Module):  # logits that put each pixel in its true class (looked up by image)
        def forward(self, images):
            out = []
            for image in images:
                index = next(i for i in range(len(ds)) if torch.equal(ds[i][0], image))
                out.append(torch.nn.functional.one_hot(ds.target(index)["semantic"], 11).permute(2, 0, 1).float() * 10)
            return torch.stack(out)

    task = Segment(ds, 11)
    perfect = task.evaluate(Oracle(), eval_loader(ds, 2, 0, DistInfo()), DistInfo())
    assert perfect["pixel_acc"] == pytest.approx(100.0)
    present = sum(1 for c in range(11) if any((ds.target(i)["semantic"] == c).any() for i in range(len(ds))))
    assert perfect["miou"] == pytest.approx(100.0 * present / 11)  # torchmetrics: an absent class scores 0


def test_map_of_ground_truth_boxes_is_100(fake_fmnist: Path):
    from sdt.engine import DistInfo, eval_loader

    ds = FashionMosaics(_mosaic_cfg(fake_fmnist, val_images=4), "val")

    class Oracle(torch.nn.Module):
        def forward(self, images):
            found = [next(i for i in range(len(ds)) if torch.equal(ds[i][0], image)) for image in images]
            return [{"boxes": ds.target(i)["boxes"], "labels": ds.target(i)["labels"],
                     "scores": torch.ones(len(ds.target(i)["boxes"]))} for i in found]

    result = Detect(ds, 11, masks=False).evaluate(Oracle(), eval_loader(ds, 2, 0, DistInfo()), DistInfo())
    assert result["map"] == pytest.approx(100.0) and result["map_50"] == pytest.approx(100.0)


def test_bad_run_config_fails_before_any_file_is_written(fake_fmnist: Path, tmp_path: Path):
    run = tmp_path / "never"
    with pytest.raises(DataError, match="data.max_side must be <= data.canvas"):
        Detect().train(load_config(DetectConfig, "detect-mosaic", _run_overrides(fake_fmnist, **{"data.max_side": 100})), str(run))
    with pytest.raises(ConfigError, match="unknown detector"):
        Detect().train(load_config(DetectConfig, "detect-mosaic", _run_overrides(fake_fmnist, **{"model.detector": "yolo"})), str(run))
    with pytest.raises(ConfigError, match="model.initial_checkpoint"):
        Segment().train(load_config(SegmentConfig, "segment-mosaic",
                                     _run_overrides(fake_fmnist, **{"model.initial_checkpoint": str(tmp_path / "none.pt")})),
                        str(run))
    assert not run.exists()


def test_cli_commands_parse_and_refuse_overrides_on_resume(fake_fmnist: Path, tmp_path: Path):
    parser = argparse.ArgumentParser(prog="sdt")
    add_dense_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["detect", "--backbone", "rmt_nano", "--detector", "fcos", "--epochs", "3",
                              "-o", "data.canvas=192"])
    assert args.command == "detect" and args.backbone == "rmt_nano" and args.default_recipe == "detect-mosaic"
    args = parser.parse_args(["segment", "--output", str(tmp_path / "r"), "--resume", "-o", "engine.epochs=3"])
    with pytest.raises(ConfigError, match="--resume continues a run with its saved config"):
        args.func(args)


def test_cli_reports_bad_input_in_one_line(fake_fmnist: Path, tmp_path: Path, capsys):
    code = main(["segment", "--output", str(tmp_path / "r"), *[a for o in _run_overrides(fake_fmnist, **{"data.canvas": 60})
                                                              for a in ("-o", o)]])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: data.max_side" not in err and "data.canvas=60 must be a multiple of the backbone's stride 32" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("norm_eval", ["true", "false"])  # false failed before the engine broadcast BatchNorm buffers
def test_two_process_detection_scores_the_same_map_as_one_process(fake_fmnist: Path, tmp_path: Path, norm_eval: str):
    # torchrun, gloo: each process scores its shard of the val mosaics; torchmetrics gathers the
    # detections, so the logged mAP must equal one process scoring all of them with the same weights
    import subprocess
    import sys

    from conftest import free_port
    from sdt.engine import DistInfo, read_metrics

    run = tmp_path / "ddp"
    overrides = _run_overrides(fake_fmnist, **{"model.detector": "fasterrcnn", "model.fpn_channels": 32,
                                               "data.train_images": 16, "data.val_images": 8, "engine.batch_size": 8,
                                               "model.detector_kwargs": json.dumps(LIGHT_RCNN),
                                               "model.norm_eval": norm_eval})  # true: BatchNorm statistics frozen
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "sdt.cli", "detect", "--output", str(run), *[a for o in overrides for a in ("-o", o)]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "val"][-1]
    cfg = load_config(DetectConfig, str(run / "config.yaml"))
    from sdt.tasks.detect import build_detector

    model = build_detector(cfg.model, cfg.data.canvas)
    model.load_state_dict(load_weights(run / "best.safetensors"))
    val = FashionMosaics(cfg.data, "val")
    # the ranks' batches (rank r: mosaics r, r + 2, ...), so only the gathering differs, not batch composition
    from sdt.data import collate

    loader = torch.utils.data.DataLoader(val, batch_size=4, sampler=[0, 2, 4, 6, 1, 3, 5, 7], collate_fn=collate)
    alone = Detect(val, 11, masks=False).evaluate(model, loader, DistInfo())
    assert alone["map"] == pytest.approx(logged["map"], abs=1e-4) and alone["mar_100"] == pytest.approx(logged["mar_100"], abs=1e-4)


def test_a_segmentation_config_with_extra_blocks_still_loads_with_a_note(tmp_path: Path):
    """The Semantic-FPN head uses the backbone's levels only, so segmentation has no extra_blocks any more;
    configs saved before (every segmentation run's config.yaml) still load, with a note. Detection keeps it."""
    old = tmp_path / "config.yaml"
    old.write_text("model:\n  backbone: rmt_nano\n  extra_blocks: maxpool\n")
    with pytest.warns(FutureWarning, match="model.extra_blocks is ignored"):
        cfg = load_config(SegmentConfig, str(old))
    assert cfg.model.backbone == "rmt_nano" and not hasattr(cfg.model, "extra_blocks")
    assert load_config(DetectConfig, None, ["model.extra_blocks=p6p7"]).model.extra_blocks == "p6p7"
