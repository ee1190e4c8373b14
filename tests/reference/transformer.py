"""PyTorch reference of the DETR Transformer and position embeddings, written from the paper and
the published structure of facebookresearch/detr (models/transformer.py, position_encoding.py).

Sequences are torch's `[L, B, C]`, maps NCHW, masks True = padded. Parameter names are DETR's.
One deliberate difference: with activation "glu", `linear2` takes `dim_feedforward // 2`
inputs (DETR declares `dim_feedforward` and so cannot run glu).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


def _with_pos(x, pos):
    return x if pos is None else x + pos


class _Layer(nn.Module):
    """Fields, feed-forward block and residual wiring shared by encoder and decoder layers."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, normalize_before,
                 num_norms):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        hidden = dim_feedforward // 2 if activation == "glu" else dim_feedforward
        self.linear2 = nn.Linear(hidden, d_model)
        for i in range(1, num_norms + 1):
            setattr(self, f"norm{i}", nn.LayerNorm(d_model))
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]
        self.normalize_before = normalize_before

    def feed_forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def residual(self, x, norm, branch):
        """Pre-norm: x + branch(norm(x)); post-norm (DETR's default): norm(x + branch(x))."""
        if self.normalize_before:
            return x + self.dropout(branch(norm(x)))
        return norm(x + self.dropout(branch(x)))


class EncoderLayer(_Layer):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, normalize_before, 2)

    def _self(self, x, key_padding_mask, pos):
        q = _with_pos(x, pos)
        return self.self_attn(q, q, x, key_padding_mask=key_padding_mask)[0]

    def forward(self, src, key_padding_mask=None, pos=None):
        src = self.residual(src, self.norm1, lambda x: self._self(x, key_padding_mask, pos))
        return self.residual(src, self.norm2, self.feed_forward)


class DecoderLayer(_Layer):
    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, normalize_before, 3)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)

    def _self(self, x, query_pos):
        q = _with_pos(x, query_pos)
        return self.self_attn(q, q, x)[0]

    def _cross(self, x, memory, key_padding_mask, pos, query_pos):
        return self.multihead_attn(_with_pos(x, query_pos), _with_pos(memory, pos), memory,
                                   key_padding_mask=key_padding_mask)[0]

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        tgt = self.residual(tgt, self.norm1, lambda x: self._self(x, query_pos))
        tgt = self.residual(
            tgt, self.norm2,
            lambda x: self._cross(x, memory, memory_key_padding_mask, pos, query_pos))
        return self.residual(tgt, self.norm3, self.feed_forward)


class Encoder(nn.Module):
    def __init__(self, layer, num_layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.norm = norm

    def forward(self, src, key_padding_mask=None, pos=None):
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class Decoder(nn.Module):
    def __init__(self, layer, num_layers, norm, return_intermediate=False):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs if self.return_intermediate else outputs[-1:])


class Transformer(nn.Module):
    """DETR's Transformer: NCHW src and pos, mask [B, H, W], query_embed [Q, C].

    Returns decoder outputs [L, B, Q, C] and the memory NCHW.
    """

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, activation="relu", normalize_before=False,
                 return_intermediate_dec=False):
        super().__init__()
        args = (d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.encoder = Encoder(EncoderLayer(*args), num_encoder_layers,
                               nn.LayerNorm(d_model) if normalize_before else None)
        self.decoder = Decoder(DecoderLayer(*args), num_decoder_layers, nn.LayerNorm(d_model),
                               return_intermediate_dec)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos_embed):
        b, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos = pos_embed.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, b, 1)
        padding = None if mask is None else mask.flatten(1)
        memory = self.encoder(src, padding, pos)
        hs = self.decoder(torch.zeros_like(query_pos), memory, padding, pos, query_pos)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(b, c, h, w)


class PositionEmbeddingSine(nn.Module):
    """mask [B, H, W] (True = padded) -> [B, 2F, H, W], channels (y, x), sin/cos interleaved."""

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()
        self.num_pos_feats, self.temperature, self.normalize = num_pos_feats, temperature, normalize
        self.scale = 2 * math.pi if scale is None else scale

    def _encode(self, pos):
        i = torch.arange(self.num_pos_feats, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor")
                                     / self.num_pos_feats)
        angles = pos[..., None] / dim_t
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)

    def forward(self, mask):
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y = y / (y[:, -1:, :] + 1e-6) * self.scale
            x = x / (x[:, :, -1:] + 1e-6) * self.scale
        return torch.cat((self._encode(y), self._encode(x)), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """[B, C, H, W] -> [B, 2F, H, W], channels (x, y), from 50-entry tables."""

    def __init__(self, num_pos_feats=256):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, x):
        b, _, h, w = x.shape
        x_emb = self.col_embed(torch.arange(w))[None].expand(h, w, -1)
        y_emb = self.row_embed(torch.arange(h))[:, None].expand(h, w, -1)
        return torch.cat([x_emb, y_emb], dim=-1).permute(2, 0, 1)[None].expand(b, -1, -1, -1)
