"""sdt.engine.plots: the run's curves."""
import warnings
from pathlib import Path

from sdt.engine.plots import plot_curves


def test_curves_plot_a_validation_metric_that_comes_without_a_validation_loss(tmp_path: Path):
    # detection logs val map but no val loss: the metric panel must still show it (it was left empty,
    # and matplotlib warned that the legend had nothing to show)
    records = [{"kind": "train", "epoch": e, "loss": 1.0 / (e + 1), "lr": 1e-3} for e in range(3)]
    records += [{"kind": "val", "epoch": e + 1, "map": 10.0 * e} for e in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves(records, tmp_path / "curves.png", "map")
    assert (tmp_path / "curves.png").stat().st_size > 0
