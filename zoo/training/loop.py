"""The training loop a recipe's ``train`` section drives (``zoo train``).

Per step: a batch (flipped at random if ``data.random_flip``), the recipe's objective
(``build_objective``) under fp32 or bf16 autocast, backward, optional gradient clipping, AdamW
at the warm-up learning rate, fp32 EMA. Every ``log_every`` steps one line and one JSONL record
(``OUT/log.jsonl``); every ``ckpt_every`` steps ``OUT/step_XXXXXXX/`` and ``OUT/last/`` (atomic);
every ``sample_every`` steps an EMA sample grid ``OUT/samples/step_XXXXXXX.png``. Ctrl-C saves
``last/``. A resumed run continues with the same batches, noise and losses.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

import zoo
from zoo.checkpoint import load_trainer_state, load_weights, load_state_dict_strict, save_checkpoint
from zoo.training.data import batches, build_dataset
from zoo.diffusion.setup import build_objective
from zoo.training.ema import EMA
from zoo.training.optim import build_optimizer, learning_rate
from zoo.sample import num_classes

DEFAULTS = {"lr": 1e-4, "batch_size": 32, "steps": 0, "weight_decay": 0.0, "ema_decay": 0.9999, "seed": 0,
            "precision": "fp32", "ckpt_every": 0, "sample_every": 0, "log_every": 100, "sample_n": 16}


def _rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "objective": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gen: torch.Generator, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["objective"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """One run: model, EMA, optimizer, data stream and the run directory ``out``."""

    def __init__(self, recipe: dict, out: str | Path, device: str | None = None, resume: str | Path | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.recipe, self.out, self.log = recipe, Path(out), log
        self.train = {**DEFAULTS, **(recipe.get("train") or {})}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        seed = int(self.train["seed"])
        data = recipe.get("data") or {}
        with torch.device("meta"):  # the data is checked before any weights are allocated
            shape = tuple(zoo.build_model(recipe).example_inputs(1)[0].shape[1:])
        dataset = build_dataset(data, shape, num_classes(recipe), seed)
        torch.manual_seed(seed)
        self.model = zoo.build_model(recipe).to(self.device).train()
        self.ema = EMA(self.model, self.train["ema_decay"])
        self.optimizer = build_optimizer(self.model, self.train)
        self.objective = build_objective(recipe)
        self.generator = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.step = 0
        if resume is not None:
            self._resume(Path(resume))
        self.flip = bool(data.get("random_flip", False))
        self.batches = batches(dataset, int(self.train["batch_size"]), seed, self.step,
                               int(data.get("num_workers", 0)), pin_memory=self.device.type == "cuda")
        self.conditional = num_classes(recipe) is not None

    def _resume(self, directory: Path) -> None:
        if (directory / "last").is_dir():
            directory = directory / "last"
        load_state_dict_strict(self.model, load_weights(directory / "model.safetensors"), str(directory))
        self.ema.load_state_dict(load_weights(directory / "ema.safetensors"))
        state = load_trainer_state(directory)
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(self.generator, state["rng"])
        self.step = int(state["step"])
        self.log(f"zoo train: resumed from {directory} at step {self.step}")

    # -- checkpoints and samples ---------------------------------------------------------------

    def save(self, also_step_dir: bool = True) -> Path:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "rng": _rng_state(self.generator)}
        args = (self.model, self.recipe)
        if also_step_dir:
            save_checkpoint(self.out / f"step_{self.step:07d}", *args, ema=self.ema.state_dict(), state=state)
        return save_checkpoint(self.out / "last", *args, ema=self.ema.state_dict(), state=state)

    def sample_grid(self) -> Path | None:
        from zoo.errors import UserError
        from zoo.sample import SampleRequest, sample_latents, save_grid, to_images

        model = copy.deepcopy(self.model)
        self.ema.copy_to(model)
        try:
            x, _ = sample_latents(model, self.recipe, SampleRequest(n=int(self.train["sample_n"]), seed=0),
                                  device=self.device)
            images = to_images(x, self.recipe, None, device=self.device)
        except UserError as err:  # e.g. a latent model without local VAE weights
            self.log(f"zoo train: warning: no sample grid: {err}")
            return None
        return save_grid(images, self.out / "samples" / f"step_{self.step:07d}.png")

    # -- the loop ---------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.train, self.step)
        bf16 = self.train["precision"] == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = self.objective(self.model, x, y if self.conditional else None, self.generator)["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.train.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.train["grad_clip"]))
        self.optimizer.step()
        self.ema.update()
        return loss.detach()

    def _every(self, key: str) -> bool:
        n = int(self.train.get(key) or 0)
        return n > 0 and self.step % n == 0

    def run(self, steps: int | None = None) -> list[dict]:
        """Train until ``steps`` (default ``train.steps``) in all; return the logged records."""
        total = int(steps if steps is not None else self.train["steps"])
        self.out.mkdir(parents=True, exist_ok=True)
        records, running, count = [], torch.zeros((), device=self.device), 0
        batch = int(self.train["batch_size"])
        tick = time.perf_counter()
        try:
            with open(self.out / "log.jsonl", "a") as log_file:
                while self.step < total:
                    x, y = next(self.batches)
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                    if self.flip:
                        flip = torch.rand(x.shape[0], generator=self.generator, device=self.generator.device) < 0.5
                        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
                    running += self.train_step(x, y)
                    count += 1
                    self.step += 1
                    if self._every("log_every"):
                        elapsed = time.perf_counter() - tick
                        rec = {"step": self.step, "loss": float(running) / count,
                               "lr": self.optimizer.param_groups[0]["lr"], "steps_per_s": count / elapsed,
                               "images_per_s": count * batch / elapsed}
                        records.append(rec)
                        log_file.write(json.dumps(rec) + "\n")
                        log_file.flush()
                        self.log(f"step {rec['step']:>7d}  loss {rec['loss']:.5f}  lr {rec['lr']:.3g}  "
                                 f"{rec['steps_per_s']:.2f} steps/s  {rec['images_per_s']:.1f} img/s")
                        running, count, tick = torch.zeros((), device=self.device), 0, time.perf_counter()
                    if self._every("ckpt_every"):
                        self.save()
                    if self._every("sample_every"):
                        self.sample_grid()
        except KeyboardInterrupt:
            self.log(f"zoo train: interrupted at step {self.step}; saving {self.out / 'last'}")
            self.save(also_step_dir=False)
            raise
        if not (self.out / "last").is_dir() or int(load_trainer_state(self.out / "last")["step"]) != self.step:
            self.save(also_step_dir=int(self.train.get("ckpt_every") or 0) > 0)
        return records


def train(recipe: dict, out: str | Path, steps: int | None = None, device: str | None = None,
          resume: str | Path | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Build a :class:`Trainer` for ``recipe`` and run it; return the logged records."""
    return Trainer(recipe, out, device=device, resume=resume, log=log).run(steps)
