"""``zoo build RECIPE``: validate a recipe, build its model and report parameters (and GFLOPs).

The model is built on ``torch.device("meta")`` by default: parameters are counted and FLOPs
measured without allocating weights, so XL models take seconds and no memory.
"""

from __future__ import annotations

import argparse
import json

from zoo.commands import add_overrides_option
from zoo.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build",
        help="validate a recipe, build its model and count parameters (and GFLOPs)",
        description="Validate RECIPE (every section), build its model and print the parameter count; "
        "--flops adds GFLOPs (multiply-adds) with a per-module table.",
    )
    p.add_argument("recipe", nargs="?", help="recipe file (or the name of a shipped recipe, e.g. dit_s_2)")
    p.add_argument("--help-component", metavar="NAME",
                   help="show one registered component's arguments (type, default, allowed values) and stop")
    add_overrides_option(p)
    p.add_argument("--print-recipe", action="store_true",
                   help="print the resolved, validated recipe as YAML (then, as comments, what the keys it leaves "
                        "out mean) and stop")
    p.add_argument("--flops", action="store_true", help="count GFLOPs of one forward pass (batch 1) per module")
    p.add_argument("--depth", type=int, default=None, help="module depth of the --flops table (default 2)")
    p.add_argument("--convention", choices=("macs", "official"), default=None,
                   help="how --flops counts: macs (default) = multiply-adds of matmuls, convolutions and attention; "
                        "official = as the model's authors counted their published figures (U-ViT, DiMR: stock fvcore "
                        "+ attention, which adds LayerNorm at 5 FLOPs per element and the like; DiT: multiply-adds)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: params, trainable_params, gflops, by_module")
    p.add_argument("--device", choices=("meta", "cpu"), default="meta",
                   help="where to build the model (default meta: nothing is allocated)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zoo.recipe import resolve  # here, not at the top: zoo --help and the other commands' parsers skip them
    from zoo.validate import model_factory, validate_recipe

    if args.help_component:
        from zoo.commands.list import show_component

        print(show_component(None, args.help_component))
        return 0
    if args.recipe is None:
        raise UserError("zoo build needs a recipe (a file or a shipped name such as dit_s_2)",
                        suggestion="or --help-component NAME to describe a component")
    if args.depth is not None and (args.depth < 0 or not (args.flops or args.json)):
        raise UserError(f"--depth {args.depth}: " + ("a depth is 0 or more" if args.depth < 0 else
                        "it sets the depth of the --flops table"), suggestion="e.g. --flops --depth 3")
    if args.print_recipe and (args.json or args.flops):
        raise UserError("--print-recipe prints the recipe and stops; it does not combine with --json or --flops",
                        suggestion="run them as two commands")
    if args.convention is not None and not (args.flops or args.json):
        raise UserError(f"--convention {args.convention}: it sets how --flops counts",
                        suggestion=f"e.g. --flops --convention {args.convention}")
    depth = 2 if args.depth is None else args.depth
    convention = args.convention or "macs"
    recipe = resolve(args.recipe, args.overrides)
    validate_recipe(recipe)  # every section, before anything is built

    import torch

    factory = model_factory(recipe)
    if args.device == "meta" or args.print_recipe:  # what it prints, zoo build would accept: checked on meta
        from zoo.meta import build_on_meta

        model = build_on_meta(factory)  # also keeps Dynamo's import (1-3 s) out of the build
    else:
        from zoo.memory import require_weights_memory

        require_weights_memory(recipe.data, args.device)  # one line, not an allocator traceback
        with torch.device(args.device):
            model = factory()
    from zoo.training.fit import check_recipe_fits_model

    try:
        check_recipe_fits_model(recipe.data, model)  # what zoo train would refuse, it refuses too
    except UserError as err:
        raise recipe.locate(err) from None
    if args.print_recipe:
        from zoo.recipe_yaml import dump_yaml

        print(dump_yaml(recipe.data, sort_keys=False, default_flow_style=None), end="")
        print(_defaults_left_out(recipe.data), end="")
        return 0
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = None
    if args.flops or args.json:
        from zoo.flops import count_flops, official_convention

        report = count_flops(model, max_depth=depth, convention=convention)

    if args.json:
        out = {"recipe": args.recipe, "model": recipe.data["model"].get("type", recipe.data["model"].get("_target_")) if isinstance(recipe.data["model"], dict)
               else recipe.data["model"], "params": params, "trainable_params": trainable,
               "gflops": float(report.gflops), "by_module": {k: float(v) for k, v in report.by_module.items()}}
        if convention != "macs":
            out["convention"] = convention
        print(json.dumps(out))
        return 0
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    print(f"{args.recipe}: {name} built on {args.device}")
    print(f"parameters: {params:,} (trainable {trainable:,})")
    if report is not None:
        if convention == "macs":
            print(f"GFLOPs (multiply-adds, batch 1): {report.gflops:.2f}\n")
        else:
            print(f"GFLOPs (official: {_OFFICIAL_RULES[official_convention(model)]}, batch 1): "
                  f"{report.gflops:.2f}\n")
        print(report.table(depth))
    return 0


_OFFICIAL_RULES = {"macs": "multiply-adds, as DiT's paper", "fvcore": "fvcore + attention, LayerNorm included"}


def _defaults_left_out(data: dict) -> str:
    """YAML comment lines naming what the ``model`` (plain values), ``diffusion``, ``data``, ``train`` and
    ``sample`` keys a recipe leaves out mean (``ema_decay`` 0.9999 changes results as much as a written key), for the
    sections it has (a section set to null is all defaults)."""
    from zoo.diffusion.sections import DIFFUSION_DEFAULTS, SAMPLE_UNSET_MEANS
    from zoo.introspect import backbone_defaults
    from zoo.recipe_yaml import dump_yaml
    from zoo.training.sections import DATA_UNSET_MEANS, TRAIN_DEFAULTS, UNSET_MEANS

    plain = (bool, int, float, str, type(None))
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    lines = []
    for section, defaults in (("model", backbone_defaults(model)), ("diffusion", DIFFUSION_DEFAULTS),
                              ("data", DATA_UNSET_MEANS), ("train", {**TRAIN_DEFAULTS, **UNSET_MEANS}),
                              ("sample", SAMPLE_UNSET_MEANS)):
        given = data.get(section)
        if section in data and given is None:  # `train: null`: every default
            given = {}
        if not isinstance(given, dict):
            continue
        unset = {key: value for key, value in defaults.items() if key not in given
                 and (isinstance(value, plain) or isinstance(value, (list, tuple)) and all(isinstance(v, plain) for v in value))}
        if unset:
            text = dump_yaml({section: unset}, sort_keys=True, default_flow_style=None, width=1000)
            lines += [f"# {line}" for line in text.splitlines()]
    if not lines:
        return ""
    return "# left out, and read as:\n" + "\n".join(lines) + "\n"
