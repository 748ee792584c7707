"""Pins on the latent VAE that a sixth round of mutation testing could change unseen: encode multiplies by
the latent scale (decode divides), load_vae brings weights stored in another dtype (fp16 on disk) to the
dtype asked for, and an LDM ``.ckpt`` whose tensors sit under ``state_dict`` is read. A tiny random
diffusers AutoencoderKL built here stands in for the SD VAE (no download)."""

from __future__ import annotations

import pytest
import torch

from zoo.vae import LatentVAE, _read_state_dict, load_vae

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=8)


def test_encode_multiplies_the_sampled_latent_by_the_scale_decode_divides():
    """Latents are z * scale (LDM's 0.18215): dividing gave latents 30x the size a model was trained on, and
    encode then decode stopped agreeing with the VAE's own round trip."""
    vae = _tiny_vae().double().eval()
    codec = LatentVAE(vae, scale=0.25, chunk_size=2)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    z = codec.encode(x, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)  # the same draws, chunk by chunk
    with torch.no_grad():
        raw = torch.cat([vae.encode(chunk).latent_dist.sample(g) for chunk in x.split(2)])
    assert z.shape == (3, 4, 4, 4)
    torch.testing.assert_close(z, raw * 0.25, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        expected = vae.decode(z / 0.25).sample.clamp(-1, 1).float()  # decode hands back float32 images
    torch.testing.assert_close(codec.decode(z), expected, rtol=0, atol=1e-6)


def test_weights_stored_in_fp16_are_loaded_in_the_dtype_asked_for(tmp_path):
    """assign=True keeps the file's dtype: without the cast an fp16 VAE on disk ran in fp16 on the CPU (and a
    float64 request got float32)."""
    vae = _tiny_vae()
    vae.half().save_pretrained(str(tmp_path / "fp16"))
    codec = load_vae(tmp_path / "fp16")
    assert {p.dtype for p in codec.vae.parameters()} == {torch.float32}
    for name, p in codec.vae.state_dict().items():
        torch.testing.assert_close(p, vae.state_dict()[name].float(), rtol=0, atol=0)
    codec64 = load_vae(tmp_path / "fp16", dtype=torch.float64)
    assert {p.dtype for p in codec64.vae.parameters()} == {torch.float64}


def test_an_ldm_checkpoint_is_read_from_its_state_dict_entry(tmp_path):
    """LDM/SD ``.ckpt`` files hold {"state_dict": {...}, "global_step": ...}: not unwrapping it refused every
    such VAE file as "not a state dict of tensors"."""
    from zoo.errors import UserError

    state = {"encoder.conv_in.weight": torch.randn(8, 3, 3, 3), "decoder.conv_out.bias": torch.randn(3)}
    torch.save({"state_dict": state, "global_step": 470000}, tmp_path / "kl-f8.ckpt")
    read = _read_state_dict(tmp_path / "kl-f8.ckpt")
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    torch.save(state, tmp_path / "plain.pth")
    assert _read_state_dict(tmp_path / "plain.pth").keys() == state.keys()
    torch.save({"state_dict": state, "step": "x", "extra": [1]}, tmp_path / "other.ckpt")
    assert _read_state_dict(tmp_path / "other.ckpt").keys() == state.keys()
    torch.save({"weights": state}, tmp_path / "nested.pth")
    with pytest.raises(UserError, match="do not hold a state dict of tensors"):
        _read_state_dict(tmp_path / "nested.pth")


def test_weights_of_another_network_are_refused_from_the_header_naming_the_callers_option(tmp_path):
    """A folder of other weights (a zoo checkpoint's ema.safetensors) passed the start-up check, which only
    found the file: zoo train then warned at every sample grid, naming --vae, a flag it refuses. The header's
    keys and shapes are checked against the VAE up front, and the message names the caller's option."""
    from safetensors.torch import save_file

    from zoo.errors import UserError
    from zoo.options import TRAIN_OPTIONS
    from zoo.vae import check_vae_weights

    _tiny_vae().save_pretrained(str(tmp_path / "vae"))
    check_vae_weights(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", TRAIN_OPTIONS)  # a VAE: it fits
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, str(tmp_path / "ema.safetensors"))
    with pytest.raises(UserError, match=r"ema.safetensors \(the VAE: data.vae\) does not match the model; "
                                        r"missing keys: encoder.conv_in.weight"):
        check_vae_weights(tmp_path / "ema.safetensors", TRAIN_OPTIONS)
    with pytest.raises(UserError, match=r"\(the VAE: --vae, or data.vae in a recipe\) does not match"):
        check_vae_weights(tmp_path / "ema.safetensors")  # zoo sample and eval: their flag, or the recipe's key
    with pytest.raises(UserError, match=r"ema.safetensors \(the VAE: data.vae\) does not match the model"):
        load_vae(tmp_path / "ema.safetensors", options=TRAIN_OPTIONS)


def _to_ldm_keys(state: dict, blocks: int) -> dict:
    """diffusers' AutoencoderKL state dict in LDM's layout (``encoder.down.0.block.0...``, the attention's
    1x1 convs): what diffusers' convert_ldm_vae_checkpoint, which zoo reads such files with, undoes."""
    import re

    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                     lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                     lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        new = new.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
        for diffusers, ldm in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            new = new.replace(f"mid_block.attentions.0.{diffusers}", f"mid.attn_1.{ldm}")
        out[new] = value[:, :, None, None] if ".attn_1." in new and value.ndim == 2 else value
    return out


def test_safetensors_weights_in_the_ldm_layout_pass_the_header_check_and_load(tmp_path):
    """The header check renames LDM keys as load_vae does: checking the keys as stored refused every
    LDM-layout .safetensors VAE (U-ViT's, SD's single-file VAEs) as 'does not match the model' before
    load_vae, which reads it fine, was reached. A four-block VAE (SD's layout, 4 channels) in a diffusers
    folder whose weights file holds LDM keys: accepted, and loaded to the same weights."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from zoo.options import TRAIN_OPTIONS
    from zoo.vae import check_vae_weights

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[4, 4, 4, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=16)
    vae.save_pretrained(str(tmp_path / "vae"))
    ldm = _to_ldm_keys(vae.state_dict(), 4)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and not any("down_blocks" in key for key in ldm)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({key: value.contiguous() for key, value in ldm.items()}, str(weights))
    check_vae_weights(weights)
    check_vae_weights(weights, TRAIN_OPTIONS)
    codec = load_vae(tmp_path / "vae")
    loaded = codec.vae.state_dict()
    assert loaded.keys() == vae.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in vae.state_dict().items())
    # zoo sample decodes a latent model's samples with it (the tiny DiT's 8x8 latents: 64x64 images)
    from pathlib import Path

    import zoo
    from zoo.checkpoint import save_checkpoint
    from zoo.cli import main

    recipe = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_dit_latent.yaml")
    save_checkpoint(tmp_path / "latent", zoo.build_model(recipe), recipe)
    assert main(["sample", str(tmp_path / "latent"), "--n", "2", "--steps", "2", "--vae", str(tmp_path / "vae"),
                 "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
    assert (tmp_path / "s.png").is_file()
