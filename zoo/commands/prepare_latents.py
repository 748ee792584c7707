"""``zoo prepare-latents IMAGE_DIR --vae VAE_DIR --out DIR``: encode an image folder into VAE latents once.

    zoo prepare-latents /data/imagenet/train --vae /weights/sd-vae-ft-ema --out /data/in256_latents
    torchrun --nproc_per_node 8 -m zoo prepare-latents /data/imagenet/train --vae ... --out ...   # 8 GPUs share the shards
    zoo train recipes/dimr_xl_2r.yaml --out runs/dimr --set data.root=/data/in256_latents

ADM centre crop to ``--resolution``, the VAE posterior (mean, std) of each image and of its
horizontal flip, labels from the sorted class folders; shards are written atomically and a
re-run finishes an interrupted one (see :mod:`zoo.latents`).
"""

from __future__ import annotations

import argparse
import os
import shlex


def usable_cpus() -> int:
    """CPUs this process may run on (``taskset``, a container's CPU set), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare-latents", help="encode an ImageNet-style image folder into VAE latents",
                              description="Encode IMAGE_DIR/CLASS/* into SD-VAE posterior moments (image and "
                              "flip) for latent recipes; resumable; splits the shards across torchrun ranks.")
    p.add_argument("image_dir", metavar="IMAGE_DIR", help="image folder laid out as IMAGE_DIR/CLASS/*.JPEG")
    p.add_argument("--vae", required=True, metavar="VAE_DIR",
                   help="local VAE weights (diffusers directory with config.json, or the SD KL-f8 VAE weights)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (shards + manifest.json)")
    p.add_argument("--resolution", type=int, default=256, help="image side after the ADM centre crop (default 256)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE batch (default 32)")
    p.add_argument("--shard-size", type=int, default=10000, help="images per shard file (default 10000)")
    p.add_argument("--workers", type=int, default=min(8, usable_cpus()),
                   help="image-decoding processes (default: the CPUs this process may use, up to 8)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="storage type of the moments (default float32; float16 halves the disk)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: this rank's GPU if there is one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from functools import partial

    from tqdm import tqdm

    from zoo.errors import reported_by_rank_0
    from zoo.latents import prepare_latents
    from zoo.training.signals import sigterm_raises

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    with reported_by_rank_0(rank):  # the same arguments on every rank: the same mistake
        device = _checked_device(args)
    if device == "cuda":  # under torchrun each process takes its own GPU, as zoo train does
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    # SIGTERM (SLURM, torchrun) stops like Ctrl-C: the workers end with the process, the shards written stay
    with sigterm_raises("; the shards written are kept, and the same command encodes the rest"):
        complete = prepare_latents(args.image_dir, args.vae, args.out, resolution=args.resolution,
                                   batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.workers,
                                   dtype=args.dtype, device=device, rank=rank, world=world,
                                   progress=partial(tqdm, disable=None) if rank == 0 else None,  # no bar off a terminal
                                   log=lambda line: print(f"zoo prepare-latents: {line}", flush=True))
    if complete:
        print(f"zoo prepare-latents: done; train with --set {shlex.quote(f'data.root={args.out}')}")
    else:
        print(f"zoo prepare-latents: rank {rank} done; the rank that finishes last writes {args.out}/manifest.json")
    return 0


def _checked_device(args: argparse.Namespace) -> str:
    """The device to encode on, after the checks of the arguments that need no files read."""
    from zoo.domains import MAX_SIZE, MAX_WORKERS
    from zoo.errors import UserError
    from zoo.guards import check_outside_checkpoints, resolve_device
    from zoo.training.distributed import check_gpus_per_node

    for name in ("resolution", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.resolution > MAX_SIZE:  # 20000 hung, a larger one was an OverflowError traceback
        raise UserError(f"--resolution must be >= 1 and at most {MAX_SIZE:,} (as data.image_size), "
                        f"got {args.resolution}")
    if not 0 <= args.workers <= MAX_WORKERS:  # 99999999999999999999 hung forking them
        raise UserError(f"--workers must be >= 0 and at most {MAX_WORKERS} (as data.num_workers), got {args.workers}")
    check_outside_checkpoints(args.out)
    device = resolve_device(args.device)  # default: cuda if there is one; checked: one line, exit 2
    check_gpus_per_node(device)  # under torchrun: a GPU per process of the node
    return str(device)
