"""The shared mathematics of prompt methods: key matching, the key-query pull loss, prefix halves, orthonormal
components (Gram-Schmidt) and the orthogonality penalty. Pure functions of tensors."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

PullMode = Literal["reference", "own"]


def uniform(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """``U(0, 1)`` draws on the CPU (the reference's initialisation of prompts, keys and attention vectors)."""
    return torch.rand(shape, generator=generator)


def cosine(query: Tensor, keys: Tensor) -> Tensor:
    """``(B, M)`` cosine similarities between queries ``(B, D)`` and keys ``(M, D)``, in float32. The query is
    detached: only the keys learn from matching."""
    q = F.normalize(query.detach().float(), dim=-1)
    return q @ F.normalize(keys.float(), dim=-1).T


def select(similarity: Tensor, k: int) -> Tensor:
    """``(B, k)`` indices of each row's ``k`` most similar keys (no task identity)."""
    if not 1 <= k <= similarity.shape[-1]:
        raise ValueError(f"cannot select {k} of {similarity.shape[-1]} keys")
    return similarity.topk(k, dim=-1).indices


def pull_loss(similarity: Tensor, chosen: Tensor, mode: PullMode) -> Tensor:
    """The key-query pull loss given ``(B, M)`` similarities and ``(B, k)`` chosen key indices.

    ``own`` (the L2P/DualPrompt papers): each query pulls the keys it chose, ``mean_b sum_j (1 - cos(q_b,
    k_chosen[b, j]))``. ``reference`` (the InfLoRA/CODA-P harness, ``(1 - cos_sim[:, chosen]).sum()``): every key
    chosen by any sample is pulled toward every query of the batch, ``sum_{b, j} sum_b' (1 - cos(q_b',
    k_chosen[b, j]))``; for one key chosen by all (DualPrompt's task key) that is ``B`` times the sum over the batch.
    """
    if mode == "own":
        return (1.0 - similarity.gather(1, chosen)).sum(dim=1).mean()
    column = similarity.sum(dim=0)  # sum over the batch's queries of cos(q_b', k_m)
    return (similarity.shape[0] - column[chosen]).sum()


def prefix_halves(prompts: Tensor) -> tuple[Tensor, Tensor]:
    """Prefix-tuning: prompts ``(..., L, D)`` give their first ``L/2`` rows as keys and last ``L/2`` as values; a
    leading selection axis ``(B, N, L, D)`` is concatenated prompt by prompt into ``(B, N * L/2, D)``."""
    half = prompts.shape[-2] // 2
    keys, values = prompts[..., :half, :], prompts[..., half:, :]
    if prompts.dim() == 4:
        b, _, _, d = prompts.shape
        keys, values = keys.reshape(b, -1, d), values.reshape(b, -1, d)
    return keys, values


def orthonormal_rows(old: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` new unit rows orthogonal to each other and to the span of the rows of ``old`` ``(s, n)``.

    CODA-Prompt's Gram-Schmidt initialisation of a new task's components: Gaussian vectors orthogonalised against
    every earlier row. Computed in float64 on ``old``'s device: projection onto the complement of the old rows'
    span (twice, for accuracy), then a QR of the residuals; returned in ``old``'s dtype. Needs ``s + count <= n``.
    """
    rows, width = old.shape
    if rows + count > width:
        raise ValueError(f"cannot draw {count} rows orthogonal to {rows} others in {width} dimensions "
                         f"(components per task x tasks must not exceed the width {width})")
    draws = torch.randn(count, width, generator=generator, dtype=torch.float64).to(old.device)
    residual = draws.T
    if rows:
        basis = torch.linalg.qr(old.detach().double().T).Q  # (n, s): an orthonormal basis of the old rows' span
        for _ in range(2):
            residual = residual - basis @ (basis.T @ residual)
    new = torch.linalg.qr(residual).Q.T  # (count, n): Gram-Schmidt of the residuals
    return new.to(old.dtype)


def ortho_penalty(rows: Tensor) -> Tensor:
    """CODA-Prompt's penalty ``mean((B B^T - I)^2)`` of a matrix of rows ``B`` ``(m, n)`` (zero iff orthonormal)."""
    gram = rows @ rows.T
    return (gram - torch.eye(rows.shape[0], dtype=rows.dtype, device=rows.device)).pow(2).mean()
