"""Subspace memory of old tasks' input spaces (GPM / DualGPM), one per adapted site.

Implements section 4 of the method specification. All linear algebra runs in float64 on the tensors' device.

Two energy rules (``energy=``):

* ``"faithful"`` (default, the reference implementation): energies are ``S**2`` of the second moment ``C``, and
  the old space is removed on the left only, ``(I - M M^T) C`` (basis mode) or ``Q Q^T C`` (complement mode).
* ``"gpm"`` (the paper / classic GPM of Saha et al. 2021, and DualGPM): energies are ``S`` of ``C = H H^T / N``,
  i.e. ``S(H)**2 / N``, and the old space is removed on both sides, ``P C P`` with ``P = I - M M^T`` (basis mode)
  or ``P = Q Q^T`` (complement mode). ``P C P = (P H)(P H)^T / N``, so its singular values are ``S(P H)**2 / N``
  and its left singular vectors are those of ``P H``: the update equals classic GPM run on the inputs ``H``.
  (The one-sided ``P C`` has neither property, so using it here would not be classic GPM after the first task.)
"""

from __future__ import annotations

from typing import Literal

import torch

Mode = Literal["basis", "complement"]
Energy = Literal["faithful", "gpm"]


def threshold(task: int, num_tasks: int | None, lamb: float, lame: float) -> float:
    """Energy threshold of task ``task`` (0-based): ``eps_t = lamb + (lame - lamb) * t / T``.

    With ``num_tasks`` unknown (``None``) the schedule cannot be computed and ``lamb`` is used for every task.
    """
    if num_tasks is None:
        return float(lamb)
    return float(lamb + (lame - lamb) * task / num_tasks)


def energies(singular_values: torch.Tensor, energy: Energy) -> torch.Tensor:
    """Energy of each direction: ``S**2`` of the second moment (faithful to the reference) or ``S`` ("gpm").

    The singular values of a second moment ``C = H H^T / N`` are ``S(H)**2 / N``, so ``"gpm"`` is the classic GPM
    energy (squared singular values of the inputs), provided the projected moment is the two-sided ``P C P``
    (see :meth:`SubspaceMemory.update`).
    """
    if energy == "faithful":
        return singular_values**2
    if energy == "gpm":
        return singular_values
    raise ValueError(f"unknown energy rule {energy!r}: expected 'faithful' or 'gpm'")


class SubspaceMemory:
    """Orthonormal basis of the old tasks' input space of one layer, or of its orthogonal complement.

    ``mode == "basis"``: ``basis`` (d, k) spans the old space. ``mode == "complement"``: ``basis`` (d, q) spans its
    orthogonal complement (DualGPM keeps whichever is smaller). ``dual=False`` is plain GPM (basis mode only).
    """

    def __init__(self, dim: int, dual: bool = True, energy: Energy = "faithful", device: torch.device | None = None):
        self.dim = int(dim)
        self.dual = bool(dual)
        energies(torch.ones(1), energy)  # validates the rule
        self.energy: Energy = energy
        self.mode: Mode = "basis"
        self.basis = torch.zeros(self.dim, 0, dtype=torch.float64, device=device)

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def size(self) -> int:
        """Number of stored columns (of the old-space basis, or of the complement's basis)."""
        return int(self.basis.shape[1])

    @property
    def memory_dim(self) -> int:
        """Dimension of the old tasks' input space held by the memory."""
        return self.size if self.mode == "basis" else self.dim - self.size

    @property
    def is_empty(self) -> bool:
        return self.mode == "basis" and self.size == 0

    def old_projector(self) -> torch.Tensor:
        """Orthogonal projector onto the old space (d, d)."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.basis.device)
        inner = self.basis @ self.basis.T
        return inner if self.mode == "basis" else eye - inner

    def new_projector(self) -> torch.Tensor:
        """Orthogonal projector onto the complement of the old space (d, d)."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.basis.device)
        return eye - self.old_projector()

    def remove_old(self, matrix: torch.Tensor) -> torch.Tensor:
        """Project the old space out of ``matrix``'s columns: ``(I - M M^T) C`` or ``Q Q^T C`` (one-sided)."""
        matrix = matrix.to(self.basis)
        if self.is_empty:
            return matrix.clone()
        proj = self.basis @ (self.basis.T @ matrix)
        return matrix - proj if self.mode == "basis" else proj

    def remove_old_two_sided(self, matrix: torch.Tensor) -> torch.Tensor:
        """Project the old space out of both sides of ``matrix``: ``P C P`` with ``P`` the projector onto the
        complement of the old space (``I - M M^T`` in basis mode, ``Q Q^T`` in complement mode).

        For ``C = H H^T / N``, ``P C P = (P H)(P H)^T / N``: singular values ``S(P H)**2 / N``, left singular
        vectors those of ``P H``.
        """
        matrix = matrix.to(self.basis)
        if self.is_empty:
            return matrix.clone()
        b = self.basis
        if self.mode == "basis":
            left = matrix - b @ (b.T @ matrix)
            return left - (left @ b) @ b.T
        return b @ ((b.T @ matrix @ b) @ b.T)

    def _project(self, matrix: torch.Tensor) -> torch.Tensor:
        """The projected moment the update measures: one-sided (``"faithful"``) or two-sided (``"gpm"``)."""
        return self.remove_old(matrix) if self.energy == "faithful" else self.remove_old_two_sided(matrix)

    # ----------------------------------------------------------------------------------------------- update
    def update(self, moment: torch.Tensor, eps: float) -> int:
        """Grow the memory with the new task's second moment ``moment`` at threshold ``eps``.

        The projected moment whose spectrum decides how many directions are added is ``(I - M M^T) C`` /
        ``Q Q^T C`` (one-sided) with ``energy="faithful"``, as the reference does, and ``P C P`` /
        ``Q Q^T C Q Q^T`` (two-sided) with ``energy="gpm"``, which makes the update classic GPM (DualGPM in
        complement mode) on the inputs ``H`` of which ``C = H H^T / N`` is the second moment.

        Returns the number of directions added to the old space (0 when nothing changed).
        """
        c = moment.to(device=self.basis.device, dtype=torch.float64)
        if c.shape != (self.dim, self.dim):
            raise ValueError(f"second moment has shape {tuple(c.shape)}, expected ({self.dim}, {self.dim})")
        if not torch.isfinite(c).all():
            raise ValueError("second moment contains NaN or inf")
        # the total energy without a decomposition: sum S(C) = trace(C) for the PSD second moment (gpm), and
        # sum S(C)**2 = ||C||_F**2 (faithful)
        total = float(torch.trace(c)) if self.energy == "gpm" else float((c * c).sum())
        if total <= 0.0:
            return 0
        if self.is_empty:
            u, s = self._spectrum(c)
            e = energies(s, self.energy)
            ratio = torch.cumsum(e, 0) / total
            k = max(1, int((ratio < eps).sum()))
            self.basis = u[:, :k].contiguous()
            added = k
        elif self.mode == "basis":
            added = self._update_basis(c, total, eps)
        else:
            added = self._update_complement(c, total, eps)
        if self.dual and self.mode == "basis" and self.size > self.dim / 2:
            u_full, _, _ = torch.linalg.svd(self.basis, full_matrices=True)
            self.basis = u_full[:, self.size :].contiguous()
            self.mode = "complement"
        return added

    def _spectrum(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left singular vectors and singular values (descending). The gpm rule's matrices are symmetric PSD
        (``C`` and ``P C P``): a symmetric eigendecomposition gives the same, faster; the faithful rule's one-sided
        ``P C`` is not symmetric and takes an SVD."""
        if self.energy == "gpm":
            values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
            return vectors.flip(1), values.flip(0).clamp(min=0.0)
        u, s, _ = torch.linalg.svd(matrix)
        return u, s

    def _update_basis(self, c: torch.Tensor, total: float, eps: float) -> int:
        u, s = self._spectrum(self._project(c))
        e = energies(s, self.energy)
        acc = (total - float(e.sum())) / total
        r = 0
        for value in (e / total).tolist():
            if acc >= eps:
                break
            acc += value
            r += 1
        if r == 0:
            return 0
        self.basis = torch.cat([self.basis, u[:, :r]], dim=1)[:, : self.dim].contiguous()
        return r

    def _update_complement(self, c: torch.Tensor, total: float, eps: float) -> int:
        u, s = self._spectrum(self._project(c))
        e = energies(s, self.energy)
        acc = float(e.sum()) / total
        r = 0
        for value in (e / total).tolist():
            if acc < 1.0 - eps:
                break
            acc -= value
            r += 1
        if r == 0:
            return 0
        q = self.basis
        shrunk = q - u[:, :r] @ (u[:, :r].T @ q)
        u_q, _, _ = torch.linalg.svd(shrunk, full_matrices=False)
        keep = max(self.size - r, 0)
        self.basis = u_q[:, :keep].contiguous()
        return min(r, self.size)

    # ----------------------------------------------------------------------------------------------- state
    def state(self) -> tuple[torch.Tensor, Mode]:
        return self.basis, self.mode

    def load(self, basis: torch.Tensor, mode: Mode) -> None:
        if mode not in ("basis", "complement"):
            raise ValueError(f"unknown memory mode {mode!r}")
        if basis.ndim != 2 or basis.shape[0] != self.dim:
            raise ValueError(f"memory basis has shape {tuple(basis.shape)}, expected ({self.dim}, k)")
        self.basis = basis.to(device=self.basis.device, dtype=torch.float64).contiguous()
        self.mode = mode

    def to(self, device: torch.device | str) -> SubspaceMemory:
        self.basis = self.basis.to(device)
        return self
