"""The test environment itself: torchvision must import with its compiled operators.
A torch build that does not match torchvision's (for example a CPU-only wheel
under a CUDA torchvision) fails here, before anything subtler does."""

import torch


def test_torchvision_imports_and_its_compiled_operators_run():
    import torchvision
    from torchvision.ops import nms, roi_align

    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    pooled = roi_align(torch.arange(16.0).view(1, 1, 4, 4), [torch.tensor([[0.0, 0, 3, 3]])], output_size=1)
    assert pooled.shape == (1, 1, 1, 1)
    assert torchvision.models.alexnet(num_classes=10).classifier[-1].out_features == 10
