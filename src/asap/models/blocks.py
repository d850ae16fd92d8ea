"""The one transformer block every model here is built from.

A pre-norm block (as in GPT-2 / ViT):

    x = x + Attention(LayerNorm(x), padding_mask)     # dropout on its output projection
    x = x + MLP(LayerNorm(x))                         # dropout on its output

The attention normalisation (softmax, Sinkhorn, ESP, ASAP) is chosen by an
:class:`~asap.attention.module.AttentionConfig`, so the same block, and hence
the same model, can be trained with one method and evaluated with another.
"""

from __future__ import annotations

from torch import Tensor, nn

from asap.attention.module import AttentionConfig, MultiheadAttention
from asap.models.config import ModelConfig


class MLP(nn.Module):
    """Position-wise feed-forward network ``dim -> hidden -> dim`` with GELU: ``(b, n, dim) -> (b, n, dim)``."""

    def __init__(self, dim: int, *, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``(b, n, dim) -> (b, n, dim)``.

    ``padding_mask (b, n)``, True = real token, is passed to the attention, which
    excludes padded tokens both as keys and as queries (for doubly-stochastic
    attention a padded query would otherwise take part in the column
    constraint). Positions that are padding carry values that nothing valid
    depends on; the model's pooling ignores them.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention: AttentionConfig | None = None,
    ):
        super().__init__()
        attention = attention if attention is not None else AttentionConfig()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiheadAttention.from_config(dim, num_heads=num_heads, config=attention, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden_dim=int(round(dim * mlp_ratio)), dropout=dropout)

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), padding_mask=padding_mask)  # dropout inside, on its projection
        return x + self.mlp(self.norm2(x))


def add_encoder(model: nn.Module, config: ModelConfig) -> None:
    """Give a classifier, after its embeddings, the trunk every model here shares: ``dropout`` (on the
    embeddings), ``config.depth`` :class:`Block` s as ``blocks``, the final LayerNorm ``norm`` and the linear
    ``head`` to ``config.num_classes`` logits. Registered in this order, which the weight initialisation follows."""
    c = config
    model.dropout = nn.Dropout(c.dropout)
    model.blocks = nn.ModuleList(
        Block(c.dim, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout, attention=c.attention)
        for _ in range(c.depth)
    )
    model.norm = nn.LayerNorm(c.dim)
    model.head = nn.Linear(c.dim, c.num_classes)
