"""``headscope mask``: export a mask to peer formats, or make a baseline mask (random, layer-wise)."""

from __future__ import annotations

import argparse

from headscope.heads import HeadscopeError, ModelFingerprint
from headscope.outputs import check_output_file

FORMATS = ("tsv", "retrieval-json", "layer-types")


def fingerprint_from_args(args: argparse.Namespace) -> ModelFingerprint:
    """The geometry of ``--model DIR`` (config only, weights never loaded) or of ``--like FILE``."""
    if args.like:
        from headscope.heads import read_json

        data = read_json(args.like, "scores or mask")
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise HeadscopeError(f"{args.like} has no 'model' fingerprint (expected a headscope scores or mask file)")
        return ModelFingerprint.from_dict(data["model"])
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from headscope.models import LoadedModel, read_config

    path = Path(args.model)
    config = read_config(path)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(config)
    return LoadedModel(model, name=path.name).fingerprint


def register(subparsers) -> None:
    from headscope.commands.fuse import add_budget_args

    parser = subparsers.add_parser("mask", help="export a head mask or make a baseline mask", description=__doc__)
    actions = parser.add_subparsers(dest="mask_action", required=True, metavar="ACTION")

    export = actions.add_parser("export", help="write a mask in a peer format")
    export.add_argument("mask", metavar="MASK.json", help="mask file (from `headscope fuse` or `headscope mask random|layerwise`)")
    export.add_argument("--format", required=True, choices=FORMATS,
                        help="tsv: DuoAttention full_attention_heads.tsv; retrieval-json: Retrieval_Head {\"layer-head\": [score]} "
                             "(needs a mask with fused scores); layer-types: Qwen3-Next layer_types (layer-wise masks only)")
    export.add_argument("--group-value", choices=["any", "fraction"], default="any", help="tsv: 1 per kept KV group, or the FA fraction")
    export.add_argument("--sink-size", type=int, help="tsv: also write DuoAttention's config.json with this sink size")
    export.add_argument("--recent-size", type=int, help="tsv: ... and this recent window")
    export.add_argument("--out", required=True, help="output file (tsv: DuoAttention's config.json goes beside it)")
    export.set_defaults(func=run_export)

    for name, help_text in (("random", "a seeded random mask: the budget `fuse` gives --ratio / --n-full, or matched to a mask"), ("layerwise", "whole layers at full attention (Qwen3-Next 3:1 layout)")):
        baseline = actions.add_parser(name, help=help_text)
        source = baseline.add_mutually_exclusive_group(required=True)
        source.add_argument("--model", help="local Hugging Face model directory (only config.json is read)")
        source.add_argument("--like", help="take the model geometry from a scores or mask file")
        if name == "random":
            source.add_argument("--kv-matched", metavar="MASK.json",
                                help="as many full-attention heads AND KV groups touched as this mask (its geometry too)")
            source.add_argument("--layer-matched", metavar="MASK.json",
                                help="as many full-attention heads AND KV groups touched as this mask in every layer, "
                                     "drawn within each layer (the stricter baseline)")
            add_budget_args(baseline)
            baseline.add_argument("--seed", type=int, default=0, help="seed of the random draw (default 0)")
        else:
            baseline.add_argument("--ratio", default="3:1", help="linear:full layers (default 3:1)")
        baseline.add_argument("--out", required=True, help="output mask JSON")
        baseline.set_defaults(func=run_baseline)


def run_export(args: argparse.Namespace) -> int:
    from headscope.heads import write_json_atomic
    from headscope.mask import (
        export_duo_tsv,
        export_retrieval_json,
        layer_types,
        load_mask,
    )

    check_output_file(args.out, inputs=[args.mask])
    mask = load_mask(args.mask)
    if args.format == "tsv":
        path = export_duo_tsv(mask, args.out, group_value=args.group_value, sink_size=args.sink_size, recent_size=args.recent_size)
    elif args.format == "retrieval-json":
        path = export_retrieval_json(mask, args.out)
    else:
        path = write_json_atomic(args.out, {"layer_types": layer_types(mask)})
    print(f"{args.mask} -> {args.format} {path}")
    return 0


def run_baseline(args: argparse.Namespace) -> int:
    from headscope.mask import (
        budget_note,
        kv_matched_random_mask,
        layer_matched_random_mask,
        layerwise_mask,
        load_mask,
        random_mask,
        save_mask,
    )

    kv, layer = getattr(args, "kv_matched", None), getattr(args, "layer_matched", None)  # mutually exclusive
    if kv or layer:
        if args.ratio is not None or args.n_full is not None or args.kv_aware:
            raise HeadscopeError(f"{'--kv-matched' if kv else '--layer-matched'} takes the budget from the mask; "
                                 "drop --ratio, --n-full and --kv-aware")
        matched = load_mask(kv or layer)
        check_output_file(args.out, inputs=[kv or layer])
        mask = (kv_matched_random_mask if kv else layer_matched_random_mask)(matched, seed=args.seed)
        matched_to = mask.provenance["selection"].get("layer_matched_to", {})
        if matched_to.get("forced_heads"):
            print(f"note: {matched_to['forced_heads']} heads are in every layer-matched mask of {layer} "
                  f"(its all-full-attention layers: {', '.join(map(str, matched_to['forced_layers']))})")
    else:
        fingerprint = fingerprint_from_args(args)
        check_output_file(args.out, [args.model])
        if args.mask_action == "random":
            mask = random_mask(fingerprint, ratio=args.ratio, n_full=args.n_full, seed=args.seed, kv_aware=args.kv_aware)
        else:
            mask = layerwise_mask(fingerprint, ratio=args.ratio)
    path = save_mask(mask, args.out)
    if note := budget_note(mask):
        print(note)
    groups = mask.kv_groups_full()
    print(f"{args.mask_action} mask: {mask.n_full} of {mask.full.numel()} heads ({mask.head_fraction:.1%}), "
          f"KV cache {mask.kv_fraction:.1%} ({int(groups.sum())} of {groups.numel()} KV groups) -> {path}")
    return 0
