"""ParNet as a detection backbone: an FPN on its multi-scale features, torchvision detectors on it.

::

    model = parnet.detection.create_detector("fcos", backbone="parnet_s", num_classes=11)
    model.train(); losses = model(images, targets)   # lists of (3, H, W) images and target dicts
    model.eval(); detections = model(images)         # [{"boxes", "scores", "labels"}, ...]

The backbone is any timm ``features_only`` model (ParNet in both forms, or ``resnet18`` etc. for
a baseline) feeding torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork`, like
torchvision's ``BackboneWithFPN``. The detectors are torchvision's FCOS, RetinaNet and Faster
R-CNN unchanged: heads, losses, box coding, anchors and NMS are all theirs. Only the anchor sizes
are set from the backbone's strides (torchvision's defaults are the same rule for stride-8..128
pyramids). Labels follow torchvision: ``1..K`` for the K categories, 0 for background, so
``num_classes = K + 1``.

One module per concern, imports flowing down this list:

* :mod:`.data`: COCO-format datasets, their annotation checks, the Fashion-MNIST detection set;
* :mod:`.backbone`: the features body, its FPN and its classification weights;
* :mod:`.detectors`: the torchvision detectors on it, saved and loaded with what rebuilds them;
* :mod:`.evaluation`: detections over a dataset, pycocotools' ``COCOeval``, pictures;
* :mod:`.inference`: a trained detector on new image files (``parnet predict-det``);
* :mod:`.train`: training and evaluating a run (``parnet train-det`` / ``eval-det``).
"""

from .backbone import FPNBackbone, build_backbone, freeze_batchnorm, load_backbone_weights
from .data import (
    CocoCheck,
    CocoDetectionDataset,
    check_coco,
    collate_detection,
    make_fashion_mnist_detection,
    repair_boxes,
)
from .detectors import (
    DETECTOR_KWARGS,
    DETECTORS,
    KWARGS_OF,
    create_detector,
    detector_config,
    load_detector,
    save_detector,
)
from .evaluation import STAT_NAMES, coco_evaluate, draw_predictions, evaluate_dataset, predict, save_png
from .inference import detect, draw_detections, format_detections
from .train import DetTrainConfig, data_paths, detector_file, eval_det, eval_folder, train_det

__all__ = [
    "DETECTORS",
    "DETECTOR_KWARGS",
    "KWARGS_OF",
    "STAT_NAMES",
    "CocoCheck",
    "CocoDetectionDataset",
    "DetTrainConfig",
    "FPNBackbone",
    "build_backbone",
    "check_coco",
    "coco_evaluate",
    "collate_detection",
    "create_detector",
    "data_paths",
    "detect",
    "detector_config",
    "detector_file",
    "draw_detections",
    "draw_predictions",
    "eval_det",
    "eval_folder",
    "evaluate_dataset",
    "format_detections",
    "freeze_batchnorm",
    "load_backbone_weights",
    "load_detector",
    "make_fashion_mnist_detection",
    "predict",
    "repair_boxes",
    "save_detector",
    "save_png",
    "train_det",
]
