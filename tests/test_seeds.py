"""The seed examples (shared/seeds/) run as written, with `nsa` as the import path.

Seed 1 (SparseAttention through a small wrapper) is here; seed 2 (the FlexAttention masks,
create_compress_mask / create_fine_mask / create_sliding_mask) is tested with nsa.flex in
tests/test_flex.py."""

import torch
from torch import nn

from nsa import SparseAttention


class MySparseAttention(nn.Module):
    def __init__(self, dim, heads = 8, qk_scale = None, dropout = 0., mask = None):
        super().__init__()
        self.sparse_attn = SparseAttention(dim, heads, qk_scale, dropout, mask)

    def forward(self, q, k, v):
        # q, k, v shape: [batch, num_queries/keys, dim]
        return self.sparse_attn(q, k, v)


def test_seed_1_sparse_attention_demo(capsys):
    # Demo Usage, as in the seed (its `if __name__ == '__main__':` body)
    batch_size = 2
    num_queries = 16
    num_keys = 32
    dim = 64
    heads = 8

    q = torch.randn(batch_size, num_queries, dim)
    k = torch.randn(batch_size, num_keys, dim)
    v = torch.randn(batch_size, num_keys, dim)

    sparse_attn = MySparseAttention(dim, heads=heads)

    output = sparse_attn(q, k, v)

    print(f"输出形状: {output.shape}")  # 预期输出: [batch_size, num_queries, dim]
    assert output.shape == torch.Size([2, 16, 64])
    assert output.isfinite().all()
    assert "torch.Size([2, 16, 64])" in capsys.readouterr().out
    output.sum().backward()                     # and it trains: every parameter gets a gradient
    assert all(p.grad is not None for p in sparse_attn.parameters())
