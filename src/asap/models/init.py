"""Weight initialisation shared by the models (the GPT-2 / ViT recipe)."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> None:
    """Linear, conv and embedding weights ~ N(0, 0.02), biases 0, LayerNorm (1, 0);
    learned position embeddings and class tokens (parameters named
    ``position_embedding`` / ``cls_token``) ~ truncated N(0, 0.02).

    A small, width-independent std keeps the initial attention scores near
    zero, i.e. close to uniform attention, for every normalisation method.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for name, param in model.named_parameters():
        if name.split(".")[-1] in ("position_embedding", "cls_token"):
            nn.init.trunc_normal_(param, std=0.02)
