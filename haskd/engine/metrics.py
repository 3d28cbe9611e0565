"""Segmentation metrics from a confusion matrix (torchmetrics-style update / compute / reset, rank-summable)."""
from __future__ import annotations

import numpy as np
import torch


class ConfusionMatrix:
    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.reset()

    def reset(self):
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred, target):
        """pred, target: (P,) ints; target -1 is ignored. Rows = ground truth, columns = prediction."""
        pred = torch.as_tensor(pred).reshape(-1).long().cpu()
        target = torch.as_tensor(target).reshape(-1).long().cpu()
        ok = (target >= 0) & (target < self.num_classes)
        idx = target[ok] * self.num_classes + pred[ok].clamp(0, self.num_classes - 1)
        self.mat += torch.bincount(idx, minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)

    def all_reduce(self):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # nccl reduces CUDA tensors only; the matrix itself stays on the CPU
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            m = self.mat.to(dev, copy=True)
            dist.all_reduce(m)
            self.mat = m.cpu()

    def compute(self, class_names=None) -> dict:
        return metrics_from_confusion(self.mat.numpy(), class_names)


def metrics_from_confusion(mat: np.ndarray, class_names=None) -> dict:
    """mIoU, mAcc, allAcc and per-class IoU. A class absent from both labels and predictions has IoU None and is
    left out of the means."""
    mat = np.asarray(mat, dtype=np.float64)
    C = mat.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(C)]
    tp = np.diag(mat)
    gt = mat.sum(1)
    pr = mat.sum(0)
    union = gt + pr - tp
    iou = [float(tp[c] / union[c]) if union[c] > 0 else None for c in range(C)]
    acc = [float(tp[c] / gt[c]) if gt[c] > 0 else None for c in range(C)]
    valid_iou = [v for v in iou if v is not None]
    valid_acc = [v for v in acc if v is not None]
    total = mat.sum()
    return {
        "miou": float(np.mean(valid_iou)) if valid_iou else 0.0,
        "macc": float(np.mean(valid_acc)) if valid_acc else 0.0,
        "allacc": float(tp.sum() / total) if total > 0 else 0.0,
        "per_class_iou": dict(zip(names, iou)),
        "per_class_acc": dict(zip(names, acc)),
        "confusion": mat.astype(np.int64).tolist(),
        "num_points": int(total),
    }
