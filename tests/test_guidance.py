"""Classifier-free guidance: one batched forward, both conventions, DiT's 3-channel quirk, learned σ, DiMR."""

import math
from pathlib import Path

import pytest
import torch
from numerics import dit_cfg_budget, fixed_sinusoid

from zoo.backbones.dit import DiT
from zoo.convert.dit import convert_state_dict
from zoo.diffusion.guidance import GuidedModel, combine, guidance_weight, power_schedule, to_dit_scale

GOLDEN = Path(__file__).parent / "golden"
NULL = 9


class ToyNet(torch.nn.Module):
    """ε depends on the label and the time input; records every call. Outputs 2C channels if learn_sigma."""

    def __init__(self, channels=4, learn_sigma=False, branches=1):
        super().__init__()
        self.scale = torch.linspace(0.5, 1.5, NULL + 1)
        self.learn_sigma, self.branches, self.calls = learn_sigma, branches, []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        eps = x * self.scale[y].view(-1, 1, 1, 1) + 0.001 * t.view(-1, 1, 1, 1)
        out = torch.cat([eps, -eps], 1) if self.learn_sigma else eps
        if self.branches > 1:  # DiMR: per-branch predictions, lowest resolution first, the model's last
            return [out[..., ::2, ::2] * 0 + 123.0] * (self.branches - 1) + [out]
        return out


def _inputs(b=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 4, 4, 4, generator=g), torch.tensor([0.2, 0.5, 0.9])[:b], torch.tensor([1, 4, 7])[:b]


def _reference(net, x, t_in, y, w):
    """Two separate passes, combined by hand."""
    cond = net(x, t_in, y)
    uncond = net(x, t_in, torch.full_like(y, NULL))
    return uncond + w * (cond - uncond)


def test_dit_golden_cfg_test_with_three_guided_channels():
    """The official ``forward_with_cfg`` (guides channels 0..2 only) reproduced to 1e-5."""
    g = torch.load(GOLDEN / "golden_dit_tiny.pt", weights_only=True)
    model = DiT(**g["config"])
    model.load_state_dict(convert_state_dict(g["state_dict"]))
    model.eval()
    case = g["cfg_test"]
    b = case["inputs"]["x"].shape[0] // 2  # the official call duplicates x[:b] and labels [y; null]
    x, t, y = case["inputs"]["x"][:b], case["inputs"]["t"][:b], case["inputs"]["y"][:b]
    assert torch.equal(case["inputs"]["y"][b:], torch.full_like(y, g["config"]["num_classes"]))
    kwargs = dict(y=y, scale=case["inputs"]["cfg_scale"], convention="dit", null_label=g["config"]["num_classes"], eps_channels=4)
    features, bound = dit_cfg_budget()  # t = 250, 700: our sinusoid's cross-CPU error, propagated
    with torch.no_grad(), fixed_sinusoid(features):
        out = GuidedModel(model, lambda t: t, channels=3, **kwargs).full_output(x, t)
        all_four = GuidedModel(model, lambda t: t, **kwargs).full_output(x, t)
    assert out.shape == (b, 8, 16, 16)
    # Float32 round-off: ~1.7e-6 per pass, times (s + |1 - s|) / 2 = 3.5 for scale 4, is 6e-6 < 1e-5.
    assert ((out - case["outputs"][:b]).abs() <= 1e-5 + bound[:b]).all()
    # Channel 3 is where the quirk shows: guiding all four channels does not reproduce it.
    assert (all_four[:, 3] - case["outputs"][:b, 3]).abs().max() > 1e-2
    assert ((all_four[:, :3] - case["outputs"][:b, :3]).abs() <= 1e-5 + bound[:b, :3]).all()


def test_one_batched_forward_with_null_labels():
    net = ToyNet()
    x, t, y = _inputs()
    out = GuidedModel(net, lambda t: 1000 * t, y=y, scale=4.0, convention="dit", null_label=NULL)(x, t)
    assert len(net.calls) == 1
    batch, t_in, labels = net.calls[0]
    assert batch == 6
    assert torch.equal(labels, torch.tensor([1, 4, 7, NULL, NULL, NULL]))
    assert torch.allclose(t_in, torch.cat([1000 * t, 1000 * t]))
    assert torch.allclose(out, _reference(ToyNet(), x, 1000 * t, y, 4.0), atol=1e-6)


def test_conventions_agree_when_w_is_one_plus_s():
    x, t, y = _inputs()
    dit = GuidedModel(ToyNet(), lambda t: t, y=y, scale=1.4, convention="dit", null_label=NULL)(x, t)
    uvit = GuidedModel(ToyNet(), lambda t: t, y=y, scale=0.4, convention="uvit", null_label=NULL)(x, t)
    assert torch.allclose(dit, uvit, atol=1e-6)
    net = ToyNet()
    cond = net(x, t, y)
    # s-convention written the U-ViT way: ε_c + s(ε_c − ε_u)
    uncond = net(x, t, torch.full_like(y, NULL))
    assert torch.allclose(uvit, cond + 0.4 * (cond - uncond), atol=1e-6)
    assert to_dit_scale(0.4, "uvit") == pytest.approx(1.4) and to_dit_scale(1.5, "dit") == 1.5
    with pytest.raises(ValueError, match="convention"):
        to_dit_scale(1.0, "diT")


def test_no_guidance_is_one_conditional_pass():
    x, t, y = _inputs()
    for scale, convention in ((1.0, "dit"), (0.0, "uvit"), (None, "dit")):
        net = ToyNet()
        out = GuidedModel(net, lambda t: t, y=y, scale=scale, convention=convention, null_label=NULL)(x, t)
        assert len(net.calls) == 1 and net.calls[0][0] == 3
        assert torch.equal(out, ToyNet()(x, t, y))


def test_learned_sigma_guides_eps_and_keeps_the_conditional_variance():
    x, t, y = _inputs()
    net = ToyNet(learn_sigma=True)
    guided = GuidedModel(net, lambda t: t, y=y, scale=3.0, convention="dit", null_label=NULL, eps_channels=4)
    out = guided(x, t)
    assert out.shape == (3, 8, 4, 4)  # [ε | v] for solvers that use the learned variance (DDPM)
    ref = _reference(ToyNet(), x, t, y, 3.0)
    assert torch.allclose(out[:, :4], ref[:, :4], atol=1e-6)
    cond = ToyNet(learn_sigma=True)(x, t, y)
    assert torch.equal(out[:, 4:], cond[:, 4:])


def test_dimr_list_output_uses_the_last_branch():
    x, t, y = _inputs()
    out = GuidedModel(ToyNet(branches=3), lambda t: t, y=y, scale=0.4, convention="uvit", null_label=NULL)(x, t)
    assert torch.allclose(out, _reference(ToyNet(), x, t, y, 1.4), atol=1e-6)
    single = GuidedModel(ToyNet(branches=2), lambda t: t, y=y)(x, t)
    assert torch.equal(single, ToyNet()(x, t, y))


def test_channel_subset_keeps_the_rest_conditional():
    # float64: combine may order the arithmetic differently from this reference expression.
    cond, uncond = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    out = combine(cond, uncond, 2.0, channels=3)
    assert torch.allclose(out[:, :3], uncond[:, :3] + 2.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3], cond[:, 3])


def test_dimr_power_schedule():
    """DiMR's released sampler: w(t) = 1 + (w − 1)·(1 − cos(π·(1 − n/1000)^p))/2 with n = 1000·t."""
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 1e-3], dtype=torch.float64)
    for p in (0.5, 1.0, 2.0):
        phi = power_schedule(t, p)
        n = 1000 * t
        expected = torch.tensor([(1 - math.cos(math.pi * (1 - v / 1000) ** p)) / 2 for v in n.tolist()], dtype=torch.float64)
        assert torch.allclose(phi, expected, atol=1e-12)
        assert phi[0] == 0 and phi[-1] > 0.99  # off at pure noise, almost full near the data
        assert (phi[1:] >= phi[:-1]).all()  # grows as t decreases
    assert power_schedule(torch.tensor(0.5), 1.0).item() == pytest.approx(0.5)
    assert power_schedule(torch.tensor(0.5), 2.0).item() == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    w = guidance_weight(torch.tensor([1.0, 0.5]), 3.0, power=1.0)
    assert torch.allclose(w, torch.tensor([1.0, 2.0]))
    assert guidance_weight(torch.tensor([1.0]), 3.0) == 3.0


def test_power_schedule_applies_per_sample():
    x, t, y = _inputs()
    out = GuidedModel(ToyNet(), lambda t: t, y=y, scale=2.5, convention="dit", null_label=NULL, power=1.0)(x, t)
    for i in range(3):
        w = 1 + 1.5 * (1 - math.cos(math.pi * (1 - t[i].item()))) / 2
        ref = _reference(ToyNet(), x[i : i + 1], t[i : i + 1], y[i : i + 1], w)
        assert torch.allclose(out[i : i + 1], ref, atol=1e-6)


def test_guidance_without_labels_is_an_error():
    with pytest.raises(ValueError, match="labels"):
        GuidedModel(ToyNet(), lambda t: t, y=None, scale=2.0, null_label=NULL)


def test_cfg_on_an_unconditional_model_is_refused_not_printed_and_ignored():
    import zoo
    from zoo.diffusion.setup import guidance_settings
    from zoo.errors import UserError

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    unconditional = zoo.load_recipe(recipes / "uvit_m_4.yaml", ["model.num_classes=0", "diffusion.null_label=null",
                                                                "sample.cfg={scale: 3.0, convention: uvit}"])
    with pytest.raises(UserError, match="--cfg 4: this model is unconditional"):
        guidance_settings(unconditional, 4.0)
    for scale in (None, 0.0):  # the recipe's own scale, or 'off' given: no guidance, said so
        settings = guidance_settings(unconditional, scale)
        assert not settings.active and settings.describe() == "no classifier-free guidance"
    conditional = zoo.load_recipe(recipes / "uvit_m_4.yaml", ["sample.cfg={scale: 3.0, convention: uvit}"])
    assert guidance_settings(conditional, 4.0).describe().startswith("cfg s=4 in the uvit convention")


def test_guiding_more_channels_than_the_model_has_is_refused():
    """sample.cfg.channels: 7 on a 3-channel model was printed ('only the first 7 channels') and all 3 were guided."""
    from zoo.diffusion.setup import GuidanceSettings, build_schedule, guided_eps_fn
    from zoo.errors import UserError

    recipe = {"diffusion": {"time_input": "dit_index", "null_label": NULL}}
    y = torch.tensor([1, 2])
    for channels in (3, None):  # as many as the model has, or all: fine
        guided_eps_fn(ToyNet(), recipe, build_schedule(recipe), y, GuidanceSettings(4.0, channels=channels), 3)
    with pytest.raises(UserError, match=r"key sample.cfg.channels: sample.cfg.channels is 7, but the model has 3 "
                                        r"channels \(at most 3, or remove it to guide every channel\)"):
        guided_eps_fn(ToyNet(), recipe, build_schedule(recipe), y, GuidanceSettings(4.0, channels=7), 3)


def test_a_guidance_weight_of_one_is_no_guidance_with_or_without_a_power_schedule():
    """DiMR's 1 + (w - 1)·decay is 1 for w = 1, yet a power made it 'active': every step ran the model on a
    doubled batch for the unguided result."""
    from zoo.diffusion.setup import GuidanceSettings

    assert not GuidanceSettings(1.0, power=2.0).active and not GuidanceSettings(0.0, "uvit", power=1.0).active
    assert GuidanceSettings(1.5, power=2.0).active and GuidanceSettings(1.5).active
    # The model wrapper agrees: one pass on the un-doubled batch (it used to run [x; x] with a power).
    net, x, y = ToyNet(channels=3), torch.randn(3, 3, 4, 4), torch.tensor([0, 1, 2])
    guided = GuidedModel(net, lambda t: t, y=y, scale=1.0, convention="dit", null_label=NULL, power=2.0)
    guided(x, torch.full((3,), 0.5))
    assert not guided.guided and [c[0] for c in net.calls] == [3]


RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.mark.parametrize("name", sorted(p.relative_to(RECIPES).with_suffix("").as_posix()
                                        for p in RECIPES.rglob("*.yaml") if not p.stem.startswith("_")))
def test_cfg_is_read_in_the_official_codes_convention_by_every_recipe(name):
    """--cfg 0.4 on a 64-px DiMR was DiT's w = 0.4 (weaker than unguided) while on DiMR-XL/2R it is
    DiMR's s = 0.4 (w = 1.4): the 64-px recipes' `cfg: null` had dropped the convention. The emoji32
    demo's U-ViT and DiMR had DiT's convention from the data and sample settings the three share."""
    import zoo
    from zoo.diffusion.setup import guidance_settings

    recipe = zoo.load_recipe(RECIPES / f"{name}.yaml")
    expected = "dit" if recipe["model"]["type"] == "dit" else "uvit"
    assert guidance_settings(recipe).convention == expected
    assert guidance_settings(recipe, 0.4).w == pytest.approx(0.4 if expected == "dit" else 1.4)


def test_guidance_asked_of_the_python_api_without_labels_or_as_text_is_refused():
    """guided_eps_fn(model, recipe, schedule, None, 1.5) switched guidance off and returned the null label's
    (unconditional) prediction; SampleRequest(cfg="1.5") reached math.isfinite as a TypeError."""
    from zoo.diffusion.setup import GuidanceSettings, build_schedule, guidance_settings, guided_eps_fn
    from zoo.errors import UserError

    recipe = {"diffusion": {"time_input": "dit_index", "null_label": NULL}, "data": {"num_classes": NULL}}
    schedule = build_schedule(recipe)
    with pytest.raises(UserError, match="needs class labels, and y is None") as err:
        guided_eps_fn(ToyNet(), recipe, schedule, None, GuidanceSettings(1.5), 4)
    assert "guidance_settings(recipe, 1) for no guidance" in err.value.suggestion
    assert not guided_eps_fn(ToyNet(), recipe, schedule, None, GuidanceSettings(1.0), 4).guided  # 'off': fine
    for scale in ("1.5", [1.5], True):
        with pytest.raises(UserError, match="the guidance scale is a number"):
            guidance_settings(recipe, scale)


def test_guidance_without_a_null_label_is_refused_from_the_recipe_before_the_weights_load():
    """It was refused only once the model was built (25 s for U-ViT-M/4), with 'sample with --cfg 1 (dit) /
    0 (uvit)' as the fix: the very flag a uvit-convention user had typed."""
    import zoo
    from zoo.errors import UserError
    from zoo.sample import SampleRequest, check_before_weights

    recipe = zoo.load_recipe(RECIPES / "uvit_m_4.yaml", ["diffusion.null_label=null", "diffusion.label_drop=0"])
    with pytest.raises(UserError, match=r"scale 1, uvit convention\) needs the null label") as err:
        check_before_weights(recipe, None, None, None, None, None, request=SampleRequest(n=1, cfg=1.0))
    assert err.value.key_path == "diffusion.null_label" and "--cfg 0" in err.value.suggestion
    check_before_weights(recipe, None, None, None, None, None, request=SampleRequest(n=1, cfg=0.0))  # off: fine
    dit = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_dit_pixels.yaml", ["sample.cfg.channels=5"])
    with pytest.raises(UserError, match="sample.cfg.channels is 5, but the model has 3 channels"):
        check_before_weights(dit, None, None, None, None, None, request=SampleRequest(n=1))
    uvit = zoo.load_recipe(RECIPES / "emoji32" / "uvit.yaml", ["sample.cfg={scale: 0.4, convention: uvit, channels: 9}"])
    with pytest.raises(UserError, match="sample.cfg.channels is 9, but the model has 3 channels"):  # its in_chans
        check_before_weights(uvit, None, None, None, None, None, request=SampleRequest(n=1))


def test_unguided_sampling_checks_memory_for_one_pass_not_a_doubled_batch(monkeypatch):
    """A conditional model sampled at w = 1 runs one forward of the batch; the memory check counted two
    (U-ViT-M/4 at batch 1200 was refused for 28 GiB, half of what fit suggested)."""
    import zoo
    import zoo.sample as sample

    recipe = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_dit_pixels.yaml")
    model, seen = zoo.build_model(recipe), []
    monkeypatch.setattr(sample, "require_sampling_memory", lambda *a, guided, **_: seen.append(guided))
    for cfg in (1.0, 1.5):
        sample.sample_latents(model, recipe, sample.SampleRequest(n=2, steps=2, cfg=cfg))
    assert seen == [False, True]
