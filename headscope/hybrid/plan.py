"""Per-layer head plan: which heads are FA, in what order the layer stores its heads, and its kind.

The builder permutes each layer's heads once so that the full-attention (FA) heads come first, sorted by
KV group, then the Gated DeltaNet (GDN) heads in their pretrained order. FA heads of one KV group are
adjacent, so the FA KV heads are whole pretrained KV groups and one SDPA call with grouped-query
attention serves every run of groups holding equally many FA heads (``fa_kv_sizes``).

Layer kinds:

* ``"hybrid"``: FA and GDN heads (or only FA heads with ``plain_full_layers=False``);
* ``"full"``: every head FA and ``plain_full_layers`` on: the layer stays the pretrained attention
  (RoPE kept; no log scaling, no gate, no fusion norm) — what a layer-wise hybrid's attention layers are;
* ``"linear"``: no FA head: a pure GDN layer (with the fusion norm and scale, like GDN's output norm).

The cache layer type follows from the heads: ``"hybrid"`` (KV + conv/recurrent state),
``"full_attention"`` (KV only) or ``"linear_attention"`` (states only).
"""

from __future__ import annotations

from dataclasses import dataclass

from headscope.heads import HeadscopeError


@dataclass(frozen=True)
class LayerPlan:
    """The head layout of one layer.

    Attributes:
        head_order: ``head_order[p]`` = pretrained head stored at position ``p`` (FA heads first).
        n_fa: number of FA heads (positions ``0 .. n_fa - 1``).
        fa_kv_groups: pretrained KV group of each FA KV head, in order.
        fa_kv_sizes: FA query heads served by each FA KV head.
        gdn_kv_groups: pretrained KV group of each GDN head (its k/v rows are initialised from it).
        kind: ``"hybrid"``, ``"full"`` or ``"linear"``.
    """

    head_order: tuple[int, ...]
    n_fa: int
    fa_kv_groups: tuple[int, ...]
    fa_kv_sizes: tuple[int, ...]
    gdn_kv_groups: tuple[int, ...]
    kind: str

    @property
    def cache_type(self) -> str:
        """The ``transformers`` cache layer type this layer needs."""
        if self.n_fa == 0:
            return "linear_attention"
        return "full_attention" if self.n_fa == len(self.head_order) else "hybrid"


def default_head_order(full_row: list[bool], group_size: int) -> list[int]:
    """FA heads sorted by (KV group, head), then GDN heads in pretrained order."""
    fa = sorted((h for h, f in enumerate(full_row) if f), key=lambda h: (h // group_size, h))
    return fa + [h for h, f in enumerate(full_row) if not f]


def plan_layer(full_row: list[bool], group_size: int, head_order: list[int] | None, plain_full_layers: bool, layer: int = 0) -> LayerPlan:
    """Validate (or choose) a layer's head order and derive its KV layout.

    Args:
        full_row: per pretrained head, True if FA.
        group_size: query heads per pretrained KV group.
        head_order: a stored order to validate, or None for ``default_head_order``.
        plain_full_layers: an all-FA layer becomes kind ``"full"`` (pretrained attention, unpermuted).
        layer: index, for error messages.
    Raises:
        HeadscopeError: the order is not a permutation, does not put FA heads first, or splits one KV
            group's FA heads.
    """
    n_heads, n_fa = len(full_row), sum(bool(f) for f in full_row)
    kind = "linear" if n_fa == 0 else ("full" if n_fa == n_heads and plain_full_layers else "hybrid")
    if head_order is None:
        head_order = list(range(n_heads)) if kind == "full" else default_head_order(full_row, group_size)
    head_order = [int(h) for h in head_order]
    if sorted(head_order) != list(range(n_heads)):
        raise HeadscopeError(f"layer {layer}: head_order {head_order} is not a permutation of {n_heads} heads")
    if not all(full_row[h] for h in head_order[:n_fa]):
        raise HeadscopeError(f"layer {layer}: head_order {head_order} does not put the {n_fa} FA heads first")
    fa_groups = [h // group_size for h in head_order[:n_fa]]
    runs: list[list[int]] = []  # [group, count]
    for group in fa_groups:
        if runs and runs[-1][0] == group:
            runs[-1][1] += 1
        elif any(r[0] == group for r in runs):
            raise HeadscopeError(f"layer {layer}: head_order {head_order} splits the FA heads of KV group {group}")
        else:
            runs.append([group, 1])
    return LayerPlan(
        head_order=tuple(head_order),
        n_fa=n_fa,
        fa_kv_groups=tuple(r[0] for r in runs),
        fa_kv_sizes=tuple(r[1] for r in runs),
        gdn_kv_groups=tuple(h // group_size for h in head_order[n_fa:]),
        kind=kind,
    )
