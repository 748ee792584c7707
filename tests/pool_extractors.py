"""Fast stand-in feature extractors for tests that compute FDs (no weights, no download)."""

import torch.nn.functional as F

from zoo.eval.extractors import Extractor


class Pool4(Extractor):
    """4x4-pooled pixels (48 features), no logits."""

    name = "test_pool4"

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1), None
