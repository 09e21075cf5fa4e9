"""The lesson's reference numbers, for comparing a run with PyTorch's.

From ``shared/reference/README.md``: the lesson's code run with torch 2.14.1 on 100 seeds
(``torch.manual_seed(0..99)``), per-epoch training loss = mean of the 938 batch losses.
"""

from __future__ import annotations

# The lesson's published run (an older software stack, slower than all 100 seeds in epochs 1-3).
PUBLISHED_LOSSES = (2.0666, 1.0482, 0.5778, 0.4490, 0.3963)

# Per epoch: (mean, std, min, max) of the training loss over 100 PyTorch seeds.
PYTORCH_LOSS_BAND = (
    (1.9013, 0.0503, 1.7695, 2.0200),
    (0.8514, 0.0427, 0.7499, 0.9501),
    (0.5263, 0.0156, 0.4966, 0.5661),
    (0.4310, 0.0083, 0.4128, 0.4547),
    (0.3862, 0.0055, 0.3723, 0.4030),
)

# Test accuracy after 5 epochs over the same 100 seeds: (mean, min, max).
PYTORCH_TEST_ACCURACY = (0.8981, 0.8920, 0.9028)
