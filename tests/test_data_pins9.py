"""Pins on the training data stream and the image-folder / latent readers that mutation testing found unheld:
a resumed run past its first epoch, a dataset of exactly one batch, latent shards stored already scaled, and the
label range check and the shard it names, and links followed by whole path components. Tiny tensors and empty
files only; no downloads."""

from __future__ import annotations

import pytest
import torch

from zoo.errors import UserError
from zoo.training.data import EpochSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_stream_resumed_after_the_first_epoch_continues_that_epoch():
    """A sampler started at step k yields what an uninterrupted one yields from step k on, for k past the first
    epoch too: one that dropped the epoch of ``start_step`` replayed epoch 0's order after every resume."""
    n, batch = 10, 3  # 3 whole batches per epoch, one sample left over
    it = iter(EpochSampler(n, batch, seed=5))
    stream = [next(it) for _ in range(batch * 12)]
    for start in (2, 3, 4, 7):
        resumed = iter(EpochSampler(n, batch, seed=5, start_step=start))
        assert [next(resumed) for _ in range(batch * 5)] == stream[start * batch:(start + 5) * batch], start


def test_a_dataset_of_exactly_one_batch_is_accepted():
    """``n == batch_size`` is one whole batch per epoch, not a refusal: only a dataset smaller than a batch is the
    recipe mistake ("fewer than train.batch_size")."""
    assert EpochSampler.batches_per_epoch(4, 4) == 1
    assert EpochSampler.batches_per_epoch(9, 4) == 2
    it = iter(EpochSampler(4, 4, seed=0))
    assert sorted(next(it) for _ in range(4)) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="the dataset has 3 samples, fewer than train.batch_size=4"):
        EpochSampler.batches_per_epoch(3, 4)


def test_latent_shards_marked_scaled_are_not_scaled_again(tmp_path):
    """Plain latent shards are multiplied by ``data.vae_scale``, except those whose metadata says
    ``{"scaled": "true"}``: scaling those again trained on latents 0.18215x too small (a near-silent signal)."""
    from safetensors.torch import save_file

    from zoo.training.data import latent_dataset

    z = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2)
    y = torch.tensor([0, 1])
    save_file({"latents": z, "labels": y}, str(tmp_path / "a.safetensors"))
    save_file({"latents": z, "labels": y}, str(tmp_path / "b.safetensors"), metadata={"scaled": "true"})
    ds = latent_dataset(tmp_path, 0.5)
    assert torch.equal(ds.tensors[0][:2], z * 0.5) and torch.equal(ds.tensors[0][2:], z)
    assert ds.tensors[1].tolist() == [0, 1, 0, 1]


def test_a_label_out_of_range_names_its_own_shard_and_row(tmp_path):
    """A bad label in the first row of the second shard names that shard, row 0: an off-by-one in the walk over the
    shards blamed the previous shard's row 2 (one past its end), sending the user to a file that is fine."""
    from safetensors.torch import save_file

    from zoo.training.data import check_against_model, latent_dataset

    z = torch.zeros(2, 4, 2, 2)
    save_file({"latents": z, "labels": torch.tensor([0, 1])}, str(tmp_path / "a.safetensors"))
    save_file({"latents": z, "labels": torch.tensor([5, 1])}, str(tmp_path / "b.safetensors"))
    ds = latent_dataset(tmp_path, 1.0)
    with pytest.raises(UserError) as info:
        check_against_model(ds, "latents", (4, 2, 2), 2, latent=True)
    assert (f"{tmp_path / 'b.safetensors'}: label 5 (sample 0) is outside the model's classes 0..1"
            in str(info.value))


def test_a_label_equal_to_the_class_count_is_refused(tmp_path):
    """Labels run 0..num_classes-1: a check that let ``label == num_classes`` through sent it to the label embedding,
    where it is the classifier-free-guidance null class (or out of the table), silently training unconditional."""
    from safetensors.torch import save_file

    from zoo.training.data import check_against_model, latent_dataset

    save_file({"latents": torch.zeros(2, 4, 2, 2), "labels": torch.tensor([1, 2])}, str(tmp_path / "a.safetensors"))
    ds = latent_dataset(tmp_path, 1.0)
    check_against_model(ds, "latents", (4, 2, 2), 3, latent=True)
    with pytest.raises(UserError, match=r"label 2 \(sample 1\) is outside the model's classes 0..1"):
        check_against_model(ds, "latents", (4, 2, 2), 2, latent=True)


def test_a_linked_folder_whose_path_is_a_prefix_of_another_is_followed(tmp_path):
    """Links are refused or left unfollowed only when they lead to the image folder itself or a folder on the way
    down: by whole path components. A string-prefix test took ``im/`` for an ancestor of ``img/cats``, dropping the
    images under a link ``img/cats/more -> im`` and refusing a class folder linked to ``im``."""
    from zoo.training.data import ImageFolder

    (tmp_path / "im").mkdir()
    (tmp_path / "im" / "x.png").touch()
    (tmp_path / "img" / "cats").mkdir(parents=True)
    (tmp_path / "img" / "cats" / "a.png").touch()
    (tmp_path / "img" / "cats" / "more").symlink_to(tmp_path / "im", target_is_directory=True)
    (tmp_path / "img" / "dogs").symlink_to(tmp_path / "im", target_is_directory=True)
    ds = ImageFolder(tmp_path / "img", 8)
    assert ds.classes == ["cats", "dogs"]
    assert [(p.relative_to(tmp_path / "img").as_posix(), label) for p, label in ds.items] == [
        ("cats/a.png", 0), ("cats/more/x.png", 0), ("dogs/x.png", 1)]
