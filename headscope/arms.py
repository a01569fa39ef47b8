"""The arms of a hybrid-quality comparison: which masks are trained, under which names, in which order.

An arm is a name and a kind; the kind says where its head mask comes from (``arm_mask``):

* ``teacher``: the original model (no mask, no training);
* ``fused``: the selected mask (``fused_mask``: the ``headscope.demo`` recipe without its RoPE-aware step,
  built-in probes scored with ``direct`` for receivers and ``path`` through each probe's top receivers for senders, ``fuse``
  with its defaults, ``select_mask``);
* ``file``: a mask file given by name (``extra``);
* ``layerwise``: whole FA layers at ``a:b`` (``layerwise_3to1``, ``layerwise_7to1``): ``n = max(1,
  round(L b / (a + b)))`` layers, layer ``floor((k + 1) L / n) - 1`` for ``k < n`` (the last layer of each
  of ``n`` equal blocks). When ``a + b`` divides ``L`` this is ``headscope.mask.layerwise_mask`` (the
  Qwen3-Next layout, layers 3, 7, ...); 6 layers get layers {2, 5} for 3:1 and {5} for 7:1
  (``layerwise_mask("7:1")`` has no FA layer in 6 layers, and "every 4th layer" would give 3:1 one
  layer, the same as 7:1);
* ``random`` (``headwise_random_7to1_s<seed>``): ``random_mask`` with the fused mask's 7:1 budget;
* ``randomkv`` (``headwise_randomkv_7to1_s<seed>``): ``kv_matched_random_mask`` of the fused mask: as many
  FA heads and KV groups touched (the same KV cache), the fair baseline of a selection that concentrates
  its heads in few groups;
* ``randomlayer`` (``headwise_randomlayer_7to1_s<seed>``): ``layer_matched_random_mask`` of the fused mask:
  as many FA heads and KV groups touched *in every layer*, drawn at random within the layer: the stricter
  baseline that tells "these heads" from "these layers" (an all-FA layer of the fused mask is the same in it).

Seeds live in the names (``headscope.seeds``): ``_s<k>`` is a random arm's mask seed, ``_t<k>`` the
transfer seed of an arm repeated over transfer runs. ``plan_arms`` orders the arms in rounds so that
every family has its first seeds if a run stops early: round ``k`` holds the ``k``-th transfer seed of
the seeded arms and the ``k``-th mask seed of the random arms, in the base order (teacher, fused, file
arms, layer-wise, random) inside a round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from headscope.heads import HeadMask, HeadscopeError, ModelFingerprint
from headscope.mask import kv_matched_random_mask, layer_matched_random_mask, layerwise_mask, parse_ratio, random_mask
from headscope.seeds import arm_family, mask_name, mask_seed, transfer_seed

BUILTIN_ARMS = ("teacher", "headwise_fused_7to1", "layerwise_3to1", "layerwise_7to1")
RANDOM_KINDS = {"plain": ("random", "headwise_random_7to1"), "kv": ("randomkv", "headwise_randomkv_7to1"),
                "layer": ("randomlayer", "headwise_randomlayer_7to1")}  # kind, name prefix
MATCHED_KINDS = ("fused", "randomkv", "randomlayer")  # kinds whose mask is, or is matched to, the fused mask


def evenly_spaced_layers(n_layers: int, ratio: str) -> list[int]:
    """``n = max(1, round(L b / (a + b)))`` FA layers for ``ratio`` = a:b, layer ``floor((k + 1) L / n) - 1``."""
    linear, full = parse_ratio(ratio)
    n_fa = max(1, (2 * n_layers * full + linear + full) // (2 * (linear + full)))  # round half up
    return [(k + 1) * n_layers // n_fa - 1 for k in range(n_fa)]


def layerwise_arm_mask(fingerprint: ModelFingerprint, ratio: str) -> HeadMask:
    """Whole FA layers for ``ratio`` = linear:full: ``layerwise_mask`` when ``a + b`` divides the layer
    count, else ``evenly_spaced_layers`` (see the module docstring)."""
    linear, full = parse_ratio(ratio)
    if fingerprint.n_layers % (linear + full) == 0:
        return layerwise_mask(fingerprint, ratio)
    n_layers = fingerprint.n_layers
    layers = evenly_spaced_layers(n_layers, ratio)
    is_full = torch.zeros(n_layers, dtype=torch.bool)  # (L,)
    is_full[layers] = True
    heads = is_full[:, None].expand(fingerprint.shape).clone()  # (L, H)
    selection = {"method": "layerwise_count", "n_full": int(heads.sum()), "full_layers": layers}
    return HeadMask(heads, fingerprint, {"ratio": ratio, "selection": selection, "probes": [], "methods": [], "fusion": None})


def fused_mask(lm, work: Path, length: int, n_pairs: int, n_receivers: int, ratio: str = "7:1") -> HeadMask:
    """The fused mask of the ``headscope.demo`` recipe without its RoPE-aware step (the plain selection the
    benchmark's baselines are measured against; a RoPE-aware mask comes in as a ``file`` arm): every built-in
    demo probe at ``length`` tokens with ``n_pairs`` pairs (seed 0), ``direct`` + ``path`` scores (files
    cached in ``work/scores``), ``fuse``, ``select_mask`` at ``ratio``."""
    from headscope.demo import REASONING_PROBES, RETRIEVAL_PROBES, score_probes
    from headscope.fusion import fuse
    from headscope.mask import select_mask
    from headscope.probes import make_probe

    (work / "scores").mkdir(parents=True, exist_ok=True)
    probes = [make_probe(name, lm.tokenizer, length=length, n_pairs=n_pairs, seed=0) for name in RETRIEVAL_PROBES + REASONING_PROBES]
    return select_mask(fuse(score_probes(lm, probes, work, n_receivers)), lm.fingerprint, ratio=ratio)


def plan_arms(extra: Iterable[str] = (), random_seeds: Sequence[int] = (0, 1, 2), random_kinds: Sequence[str] = ("plain",),
              transfer_seeds: Sequence[int] = (), seeded: Iterable[str] = (), only: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(arm name, kind) in run order (rounds, see the module docstring).

    Args:
        extra: names of the mask-file arms (kind ``file``).
        random_seeds: mask seeds of the random arms.
        random_kinds: ``"plain"``, ``"kv"`` and/or ``"layer"`` (``RANDOM_KINDS``).
        transfer_seeds: when given, every arm or family in ``seeded`` runs once per seed, named ``<arm>_t<seed>``.
        seeded: arms or families repeated per transfer seed.
        only: keep the arms whose name, mask name or family is listed (None: all).
    Raises:
        HeadscopeError: a name in ``seeded`` (with transfer seeds) or ``only`` that no arm answers to.
    """
    seeded = set(seeded)
    base = [("teacher", "teacher", 0), ("headwise_fused_7to1", "fused", 0)] + [(name, "file", 0) for name in extra]
    base += [("layerwise_3to1", "layerwise", 0), ("layerwise_7to1", "layerwise", 0)]
    base += [(f"{RANDOM_KINDS[k][1]}_s{seed}", RANDOM_KINDS[k][0], index) for index, seed in enumerate(random_seeds) for k in random_kinds]
    known = {n for n, _, _ in base} | {arm_family(n) for n, _, _ in base}
    unknown = sorted(seeded - known) if transfer_seeds else []
    if unknown:
        raise HeadscopeError(f"--seeded-arms: unknown arms {unknown}; known: {', '.join(sorted(known - {'teacher'}))}")
    arms = []
    for name, kind, round_ in base:
        if transfer_seeds and (name in seeded or arm_family(name) in seeded):
            arms += [(f"{name}_t{seed}", kind, max(round_, index)) for index, seed in enumerate(transfer_seeds)]
        else:
            arms.append((name, kind, round_))
    arms.sort(key=lambda arm: arm[2])  # stable: round by round, in the base order inside a round
    if only is not None:
        wanted = set(only)
        labels = {n: {n, mask_name(n), arm_family(n)} for n, _, _ in arms}
        unknown = sorted(wanted - set().union(*labels.values()))
        if unknown:
            raise HeadscopeError(f"unknown arms {unknown}; known: {', '.join(n for n, _, _ in arms)}")
        arms = [a for a in arms if labels[a[0]] & wanted]
    return [(name, kind) for name, kind, _ in arms]


def arm_mask(name: str, kind: str, fingerprint: ModelFingerprint, fused: HeadMask | None, extra: Mapping[str, HeadMask]) -> HeadMask:
    """The mask of one hybrid arm (``fused``: the fused mask; ``extra``: the mask-file arms' masks by name)."""
    if kind in MATCHED_KINDS and fused is None:
        raise HeadscopeError("the fused mask is missing (its computation failed)")
    if kind == "fused":
        return fused
    if kind == "file":
        return extra[mask_name(name)]
    if kind == "random":
        return random_mask(fingerprint, ratio="7:1", seed=mask_seed(name))
    if kind == "randomkv":
        return kv_matched_random_mask(fused, seed=mask_seed(name))
    if kind == "randomlayer":
        return layer_matched_random_mask(fused, seed=mask_seed(name))
    return layerwise_arm_mask(fingerprint, arm_family(name).split("_")[1].replace("to", ":"))


def arm_seed(name: str, default: int) -> int:
    """The transfer seed of an arm: its ``_t<seed>``, else ``default``."""
    seed = transfer_seed(name)
    return default if seed is None else seed
