"""Vision Transformer: conv patch embedding, class token, pre-norm blocks, head.

    images (b, c, H, W) --patches--> (b, N, dim) --[cls] + pos--> (b, N+1, dim) --blocks--> cls (b, dim) --> (b, classes)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from asap.models.blocks import add_encoder
from asap.models.config import ViTConfig
from asap.models.init import init_weights


class VisionTransformer(nn.Module):
    """ViT classifier: ``forward(images (b, in_channels, image_size, image_size) float) -> logits (b, num_classes)``.

    A stride-``patch_size`` convolution is the patch embedding (one linear map
    per non-overlapping patch). All tokens are real, so no mask is used.
    """

    input_names = ("images",)

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embedding = nn.Conv2d(c.in_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.position_embedding = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.dim))
        add_encoder(self, c)
        init_weights(self)

    def forward(self, images: Tensor) -> Tensor:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected or not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor (b, {', '.join(map(str, expected))}); "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        x = self.patch_embedding(images).flatten(2).transpose(1, 2)  # (b, N, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.dropout(x + self.position_embedding)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
