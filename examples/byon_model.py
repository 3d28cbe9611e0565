"""Bring your own network: a user-defined student trained with HAS-KD through the CLI.

    haskd pipeline --config demo_synthetic --data DATA --out runs/byon \
        model.module=examples/byon_model.py model.name=my_pointnet
"""
import torch
import torch.nn as nn

from haskd.models import register
from haskd.models.protocol import HookedBackbone
from haskd.sparse import SparseTensor, SubMConv3d


class MyPointNet(nn.Module):
    """Any network that maps the batch dict to per-voxel logits; it knows nothing about distillation."""

    def __init__(self, in_channels, num_classes, width=32):
        super().__init__()
        self.conv1 = SubMConv3d(in_channels, width, 3)
        self.conv2 = SubMConv3d(width, width, 3)
        self.embed = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, batch):
        x = SparseTensor.from_batch(batch["grid_coord"], batch["feat"], batch["offset"])
        x = x.replace_feats(torch.relu(self.conv1(x).feats))
        h = self.embed(torch.relu(self.conv2(x).feats))
        return self.head(h)  # (N, num_classes): logits only


def build(in_channels, num_classes, preset="small", backend="auto", **kwargs):
    # The feature for IHD's feature term is the output of `embed`, captured by a forward hook.
    return HookedBackbone(MyPointNet(in_channels, num_classes, **kwargs), feat_module="embed")


register("my_pointnet", build)
