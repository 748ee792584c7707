"""``zoo eval --distortion``'s options and the check of its classifier against the checkpoint (no torch import:
the CLI builds its parsers without importing torch)."""

from __future__ import annotations

from typing import Any

from zoo.errors import UserError


def add_options(parser) -> None:
    """``zoo eval``'s distortion options."""
    parser.add_argument("--distortion", action="store_true",
                        help="also score each sample for its own class with --classifier: the share below --threshold "
                        "(overall, per class) and a grid of the rejected samples")
    parser.add_argument("--classifier", default=None, metavar="DIR_OR_TIMM",
                        help="a zoo train-classifier directory, or timm:NAME with --classifier-weights")
    parser.add_argument("--classifier-weights", default=None, metavar="FILE",
                        help="local weights of a timm:NAME classifier (.safetensors or .pth state dict)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="a sample is rejected when its own-class probability is below this (default 0.5)")


def scorer_for(args, device: Any) -> Any:
    """The classifier ``zoo eval --distortion`` asked for, checked against the checkpoint before any sampling."""
    if not args.distortion:
        given = [flag for flag, value in (("--classifier", args.classifier), ("--classifier-weights",
                 args.classifier_weights), ("--threshold", args.threshold)) if value is not None]
        if given:  # else ignored without a word
            named = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
            raise UserError(f"{named} {'go' if len(given) > 1 else 'goes'} with --distortion",
                            suggestion="add --distortion (with --classifier) to score the samples")
        return None
    if args.threshold is None:
        args.threshold = 0.5
    from zoo.checkpoint import read_config
    from zoo.eval.distortion import build_scorer, check_classes, check_threshold

    check_threshold(args.threshold)
    from zoo.eval.runner import locate
    from zoo.sample import num_classes
    from zoo.training.data import gives_latents

    ckpt, _ = locate(args.source)
    recipe = read_config(ckpt)
    scorer = build_scorer(args.classifier, args.classifier_weights, device)
    check_classes(scorer, num_classes(recipe), f"checkpoint {ckpt}")
    data = recipe.get("data") or {}
    size = data.get("image_size")
    if scorer.image_size is not None and size is not None and not gives_latents(data) and int(size) != scorer.image_size:
        raise UserError(f"classifier {args.classifier} takes {scorer.image_size}x{scorer.image_size} images, "
                        f"checkpoint {ckpt} generates {size}x{size}; train one with --image-size {size}")
    return scorer
