"""Sparsity reports: counts per target and overall, printable as a table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetSparsity:
    """Pruned entries of one target parameter."""

    name: str
    total: int
    pruned: int

    @property
    def fraction(self) -> float:
        return self.pruned / self.total if self.total else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Pruned counts per target and overall; ``str()`` gives a readable table.

    >>> r = SparsityReport((TargetSparsity("fc.weight", 10, 9),))
    >>> r.fraction, r.per_target()
    (0.9, {'fc.weight': 0.9})
    """

    targets: tuple[TargetSparsity, ...]

    @property
    def total(self) -> int:
        return sum(t.total for t in self.targets)

    @property
    def pruned(self) -> int:
        return sum(t.pruned for t in self.targets)

    @property
    def fraction(self) -> float:
        """Global sparsity: pruned / total over all targets."""
        return self.pruned / self.total if self.total else 0.0

    def per_target(self) -> dict[str, float]:
        """Name -> fraction pruned."""
        return {t.name: t.fraction for t in self.targets}

    def __str__(self) -> str:
        width = max([len(t.name) for t in self.targets] + [len("target"), len("global")])
        lines = [f"{'target':<{width}}  {'total':>12}  {'pruned':>12}  {'sparsity':>8}"]
        lines += [
            f"{t.name:<{width}}  {t.total:>12,}  {t.pruned:>12,}  {t.fraction:>8.2%}"
            for t in self.targets
        ]
        lines.append(
            f"{'global':<{width}}  {self.total:>12,}  {self.pruned:>12,}  {self.fraction:>8.2%}"
        )
        return "\n".join(lines)
