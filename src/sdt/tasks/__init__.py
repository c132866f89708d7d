"""Tasks: what a run trains and how it is scored, each a class on ``Task`` (``base``). A run is
``Task().train(cfg, output_dir, resume)``.

    Classify (sdt train), Generate (sdt gen-train), Detect (sdt detect), Segment (sdt segment)
"""
from .base import Task
from .classify import Classify, TrainConfig
from .detect import Detect, DetectConfig
from .generate import GenConfig, Generate
from .segment import Segment, SegmentConfig

__all__ = ["Classify", "DetectConfig", "Detect", "GenConfig", "Generate", "Segment", "SegmentConfig", "Task", "TrainConfig"]
