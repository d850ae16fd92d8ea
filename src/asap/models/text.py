"""Text classifier: token + position embeddings, pre-norm blocks, pooling, head.

    input_ids (b, n) --embed--> (b, n, dim) --blocks--> (b, n, dim) --pool--> (b, dim) --head--> (b, classes)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from asap.models.blocks import add_encoder
from asap.models.config import TextClassifierConfig
from asap.models.init import init_weights


class TextClassifier(nn.Module):
    """Transformer encoder classifier over token ids.

    ``forward(input_ids (b, n) int64, *, padding_mask (b, n) bool, True = real token)``
    returns logits ``(b, num_classes)``. Padding is excluded from attention
    (as keys and as queries) and from mean pooling, so the logits of a padded
    sequence do not depend on how much padding it carries.
    """

    input_names = ("input_ids", "padding_mask")

    def __init__(self, config: TextClassifierConfig):
        super().__init__()
        self.config = config
        c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.pooling == "cls" else None
        num_positions = c.max_length + (1 if c.pooling == "cls" else 0)
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, c.dim))
        add_encoder(self, c)
        init_weights(self)

    def forward(self, input_ids: Tensor, *, padding_mask: Tensor | None = None) -> Tensor:
        self._check_inputs(input_ids, padding_mask)
        b, n = input_ids.shape
        x = self.token_embedding(input_ids)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
            if padding_mask is not None:
                padding_mask = torch.cat([padding_mask.new_ones(b, 1), padding_mask], dim=1)
        x = self.dropout(x + self.position_embedding[:, : x.shape[1]])
        for block in self.blocks:
            x = block(x, padding_mask=padding_mask)
        x = self.norm(x)
        return self.head(self._pool(x, padding_mask))

    def _pool(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        """``(b, n, dim) -> (b, dim)``: the class token, or the mean over real tokens."""
        if self.cls_token is not None:
            return x[:, 0]
        if padding_mask is None:
            return x.mean(dim=1)
        weights = padding_mask.to(x.dtype).unsqueeze(-1)
        # clamp: an all-padding sequence pools to zeros instead of 0/0 = NaN.
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def _check_inputs(self, input_ids: Tensor, padding_mask: Tensor | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor (b, n); got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] > self.config.max_length:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds the model's max_length {self.config.max_length}"
            )
        if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.shape != input_ids.shape):
            raise ValueError(
                f"padding_mask must be bool with the shape of input_ids {tuple(input_ids.shape)} "
                f"(True = real token); got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
