"""Data pipeline: COCO-format dataset, DETR transforms, padded batching, COCO evaluation, shapes set."""
from .coco import CocoDetection, collate, find_split, load_coco  # noqa: F401
from .coco_eval import CocoEvaluator  # noqa: F401
from .transforms import COCO_SCALES, SHAPES_SCALES, make_transforms  # noqa: F401
