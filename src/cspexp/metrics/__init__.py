"""Segmentation metrics with LISA's definitions."""

from cspexp.metrics.seg_iou import SegIoU, intersection_and_union

__all__ = ["SegIoU", "intersection_and_union"]
