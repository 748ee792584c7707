"""FLOP counting: closed forms for attention and convolutions, meta vs CPU, torch vs fvcore.

Counts are MACs ("GFLOPs" as the field reports them). The tiny DiT / U-ViT / DiMR models are
the official constructor configs of the golden files, built through the converters' specs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.blocks.attention import Attention
from zoo.errors import UserError
from zoo.flops import attention_macs, count_flops

GOLDEN = Path(__file__).parent / "golden"
TINY = {"dit": "golden_dit_tiny.pt", "uvit": "golden_uvit_tiny.pt", "dimr": "golden_dimr_tiny_r3.pt"}


class _SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _Convs(nn.Module):
    """Patchify (k = s = 4), depthwise 7×7, 3×3 head: the convolutions of DiT/U-ViT/DiMR."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.head = nn.Conv2d(16, 5, 3, padding=1)

    def forward(self, x):
        return self.head(self.dw(self.patch(x)))


class _Elementwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.norm(x)) + x * 2


class _CpuInputsNet(nn.Module):
    """A plugin backbone whose example_inputs take no device (one says cpu outright)."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x, t, y=None):
        return self.lin(x.flatten(1)).view_as(x)

    def example_inputs(self, batch):
        return torch.randn(batch, 3, 2, 2, device="cpu"), torch.rand(batch), torch.zeros(batch, dtype=torch.long)


class _ItemInputsNet(_CpuInputsNet):
    def example_inputs(self, batch):
        return torch.randn(batch, 3, 2, 2), torch.full((batch,), torch.rand(()).item()), None


def _tiny_model(family: str, device: str) -> nn.Module:
    from zoo.convert import get_family

    config = torch.load(GOLDEN / TINY[family], weights_only=True)["config"]
    spec = get_family(family).official_config_to_model_spec(config)
    with torch.device(device):
        torch.manual_seed(0)
        return zoo.build_model({"model": spec})


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_sdpa_is_counted_with_the_closed_form(device):
    # Lq != Lk and E != Ev, so a formula that swaps them fails.
    q = torch.randn(2, 3, 5, 8, device=device)
    k = torch.randn(2, 3, 7, 8, device=device)
    v = torch.randn(2, 3, 7, 6, device=device)
    report = count_flops(_SDPA(), (q, k, v))
    assert report.gflops * 1e9 == 2 * 3 * 5 * 7 * (8 + 6)
    assert attention_macs(q.shape, k.shape, v.shape) == 2 * 3 * 5 * 7 * (8 + 6)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_attention_layer_equals_closed_form(device):
    B, L, D, H = 2, 16, 64, 4
    with torch.device(device):
        layer = Attention(D, H)
    report = count_flops(layer, (torch.randn(B, L, D, device=device),), max_depth=1)
    qkv, proj, attn = B * L * D * 3 * D, B * L * D * D, B * H * L * L * 2 * (D // H)
    assert report.gflops * 1e9 == qkv + proj + attn
    assert report.by_module["qkv"] * 1e9 == qkv and report.by_module["proj"] * 1e9 == proj


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_convolutions_are_counted(device):
    with torch.device(device):
        model = _Convs()
    report = count_flops(model, (torch.randn(2, 3, 32, 32, device=device),), max_depth=1)
    # MACs = output elements × input channels per group × kernel area
    patch, dw, head = 2 * 16 * 8 * 8 * 3 * 16, 2 * 16 * 8 * 8 * 1 * 49, 2 * 5 * 8 * 8 * 16 * 9
    assert [report.by_module[k] * 1e9 for k in ("patch", "dw", "head")] == [patch, dw, head]
    assert report.gflops * 1e9 == patch + dw + head


def test_elementwise_ops_are_not_counted():
    assert count_flops(_Elementwise(), (torch.randn(4, 10, 32),)).gflops == 0


def test_containers_sum_their_children_and_params_are_reported():
    stack = nn.Sequential(nn.Linear(8, 16), nn.ModuleList([nn.Linear(16, 16)]))
    stack.forward = lambda x: stack[1][0](stack[0](x))  # the ModuleList itself never runs
    stack[0].weight.requires_grad_(False)
    report = count_flops(stack, (torch.randn(3, 8),), max_depth=2)
    assert report.by_module["1"] == report.by_module["1.0"] == pytest.approx(3 * 16 * 16 / 1e9)
    assert report.params == 8 * 16 + 16 + 16 * 16 + 16
    assert report.trainable_params == report.params - 8 * 16
    assert report.to_dict() == {"params": report.params, "trainable_params": report.trainable_params,
                                "gflops": report.gflops}
    assert "1.0" in report.table(2) and "1.0" not in report.table(1)


def test_count_restores_training_mode_and_rejects_bad_counters():
    model = _Convs().train()
    count_flops(model, (torch.randn(1, 3, 8, 8),))
    assert all(m.training for m in model.modules())
    with pytest.raises(UserError, match="unknown FLOP counter"):
        count_flops(model, (torch.randn(1, 3, 8, 8),), counter="ptflops")
    with torch.device("meta"):
        meta = _Convs()
    with pytest.raises(UserError, match="real tensors"):
        count_flops(meta, (torch.randn(1, 3, 8, 8, device="meta"),), counter="fvcore")
    # no inputs and no example_inputs: the fix names both ways (it said "pass inputs=", which the CLI cannot)
    with pytest.raises(UserError,
                       match=r"_Convs has no example_inputs\(batch\) method, .*count_flops\(model, inputs=") as err:
        count_flops(model)
    assert str(err.value).count("give the class example_inputs(batch)") == 1  # the hint once, not inside itself


def test_dit_tiny_matches_closed_form():
    model = _tiny_model("dit", "meta")
    D, depth, p, C, T, K = 64, 2, 2, 4, (16 // 2) ** 2, 10
    block = T * 12 * D * D + 2 * T * T * D + 6 * D * D  # qkv+proj+mlp per token, attention, adaLN per sample
    head = 2 * D * D + T * D * p * p * 2 * C
    embed = T * p * p * C * D + 256 * D + D * D
    report = count_flops(model, max_depth=1)
    assert report.gflops * 1e9 == depth * block + head + embed
    assert report.by_module["blocks"] * 1e9 == depth * block
    block_params = 18 * D * D + 15 * D
    params = depth * block_params + (2 * D * D + 2 * D) + (D * p * p * 2 * C + p * p * 2 * C) \
        + (p * p * C * D + D) + (256 * D + D + D * D + D) + (K + 1) * D + T * D
    assert report.params == params and report.trainable_params == params - T * D  # pos table frozen


def test_table_rows_add_up_to_the_total_parameters():
    """DiT's pos_embed is a parameter of the model itself: an (other) row holds it though it costs no FLOPs."""
    model = _tiny_model("dit", "meta")
    report = count_flops(model, max_depth=1)
    rows = {line.split()[0]: line.split() for line in report.table().splitlines()[1:]}
    T, D = (16 // 2) ** 2, 64
    assert rows["(other)"][1:3] == [f"{T * D:,}", "0.000"]
    assert sum(int(r[1].replace(",", "")) for name, r in rows.items() if name != "total") == report.params
    stack = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))  # everything inside its submodules: no (other) row
    assert "(other)" not in count_flops(stack, (torch.randn(3, 8),)).table()


@pytest.mark.parametrize("family", sorted(TINY))
def test_meta_and_cpu_counts_agree(family):
    meta = count_flops(_tiny_model(family, "meta"), max_depth=9)  # meta: cached kernels, memoised blocks
    cpu = count_flops(_tiny_model(family, "cpu"), max_depth=9)
    assert meta.gflops > 0 and meta.gflops == pytest.approx(cpu.gflops, rel=1e-12)
    assert meta.by_module == pytest.approx(cpu.by_module, rel=1e-12)
    assert meta.params == cpu.params


@pytest.mark.parametrize("family", sorted(TINY))
def test_fvcore_with_sdpa_handle_agrees_with_torch(family):
    model = _tiny_model(family, "cpu")
    inputs = model.example_inputs(2)
    ours = count_flops(model, inputs)
    fv = count_flops(model, inputs, counter="fvcore")
    assert fv.gflops == pytest.approx(ours.gflops, rel=1e-3)
    dropped = count_flops(model, inputs, counter="fvcore", fvcore_sdpa_handle=False)
    assert dropped.gflops < fv.gflops  # stock fvcore drops attention


def test_dimr_breakdown_shows_each_branch():
    model = _tiny_model("dimr", "meta")
    report = count_flops(model, max_depth=2)
    branches = [k for k in report.by_module if k.startswith("branches.") and k.count(".") == 1]
    assert len(branches) == 3
    assert all(report.by_module[b] > 0 for b in branches)
    assert sum(report.by_module[b] for b in branches) <= report.gflops * (1 + 1e-9)
    table = report.table()
    assert all(b in table for b in branches)


def test_stock_fvcore_gives_5_46_for_dit_s2_because_it_drops_sdpa():
    """fvcore reports DiT-S/2 as 5.46 GFLOPs; the paper's 6.06 includes attention."""
    from fvcore.nn import FlopCountAnalysis

    from zoo.backbones.dit import DiT

    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=2, hidden_size=384, depth=12, num_heads=6).eval()
    inputs = model.example_inputs(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = FlopCountAnalysis(model, inputs)
        stock.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        stock_total = stock.total() / 1e9
        unsupported = stock.unsupported_ops()
    ours = count_flops(model, inputs)
    attention = 12 * 6 * 256 * 256 * (64 + 64) / 1e9
    assert round(stock_total, 2) == 5.46 and unsupported["aten::scaled_dot_product_attention"] == 12
    assert round(ours.gflops, 2) == 6.06
    # the gap is the attention matmuls (plus fvcore's LayerNorm count, which the convention omits)
    assert ours.gflops - stock_total == pytest.approx(attention, rel=0.02)
    assert count_flops(model, inputs, counter="fvcore").gflops == pytest.approx(ours.gflops, rel=1e-9)


class _FvcoreCounted(nn.Module):
    """The ops fvcore's default handles count beyond multiply-adds (U-ViT's and DiMR's convention)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.ln_plain = nn.LayerNorm(8, elementwise_affine=False)
        self.gn = nn.GroupNorm(2, 8)

    def forward(self, x):
        x = self.gn(self.conv(x))
        x = self.ln_plain(self.ln(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = F.interpolate(x, scale_factor=2, mode="nearest") + F.interpolate(x, scale_factor=2, mode="bilinear")
        return F.adaptive_avg_pool2d(x, 4)


def _stock_fvcore(model, inputs) -> float:
    """fvcore's own count (default handles) plus an SDPA handle: how U-ViT and DiMR report GFLOPs."""
    from fvcore.nn import FlopCountAnalysis

    from zoo.flops import fvcore_attention_handle

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        analysis.set_op_handle(**{"aten::scaled_dot_product_attention": fvcore_attention_handle})
        return analysis.total() / 1e9


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_official_convention_counts_what_stock_fvcore_counts(device):
    with torch.device(device):
        model = _FvcoreCounted()
    x = torch.randn(2, 3, 8, 8, device=device)
    conv = 2 * 8 * 64 * 27
    norms = 2 * 8 * 64 * (5 + 5 + 4)  # GroupNorm, LayerNorm (affine), LayerNorm (no affine)
    upsample = 2 * 8 * 256 * (1 + 4)  # nearest 1, bilinear 4 per output element
    pool = 2 * 8 * 256  # 1 per input element
    assert count_flops(model, (x,)).gflops * 1e9 == conv
    official = count_flops(model, (x,), convention="official").gflops * 1e9
    assert official == pytest.approx(conv + norms + upsample + pool, abs=1e-3)
    if device == "cpu":
        assert official == pytest.approx(_stock_fvcore(model, (x,)) * 1e9, abs=1e-3)


def test_official_convention_of_tiny_uvit_is_stock_fvcore_plus_attention():
    model = _tiny_model("uvit", "cpu")
    inputs = model.example_inputs(1)
    official = count_flops(model, inputs, convention="official").gflops
    assert official > count_flops(model, inputs).gflops
    assert official == pytest.approx(_stock_fvcore(model, inputs), rel=1e-12)
    meta = count_flops(_tiny_model("uvit", "meta"), convention="official").gflops
    assert meta == pytest.approx(official, rel=1e-12)


@pytest.mark.parametrize("batch", [1, 3])
def test_official_convention_counts_dimr_td_layernorm_as_affine(batch, monkeypatch):
    """The official TD-LN is an affine LayerNorm (5 per element) whenever the batch shares one time; zoo's
    takes the plain one plus a per-sample addcmul for a batch of times: counted as the official one. A
    branch's downsampled input (official: area interpolation, fvcore 1 per input element) is counted too."""
    from zoo.conditioning.time_dependent import TimeDependentLayerNorm

    model = _tiny_model("dimr", "meta")
    inputs = model.example_inputs(batch)
    elements = []
    hooks = [m.register_forward_hook(lambda mod, args, out: elements.append(args[0].numel()))
             for m in model.modules() if isinstance(m, TimeDependentLayerNorm)]
    pooled = []
    avg_pool2d = F.avg_pool2d

    def spy(x, *args, **kwargs):
        pooled.append(x.numel())
        return avg_pool2d(x, *args, **kwargs)

    monkeypatch.setattr(F, "avg_pool2d", spy)
    try:
        count_flops(model, inputs)  # collects the TD-LN and downsampling input sizes
    finally:
        monkeypatch.undo()
        for h in hooks:
            h.remove()
    assert elements and pooled
    macs = count_flops(model, inputs).gflops
    official = count_flops(model, inputs, convention="official").gflops
    assert (official - macs) * 1e9 == pytest.approx(5 * sum(elements) + sum(pooled), abs=1e-3)


def test_official_convention_of_dit_is_multiply_adds():
    """DiT's published figures are multiply-adds: stock fvcore (LayerNorm at 4 per element) reads DiT-S/2
    as 6.07, the paper 6.06."""
    from zoo.backbones.dit import DiT

    with torch.device("meta"):
        model = DiT(input_size=32, patch_size=2, hidden_size=384, depth=12, num_heads=6)
    assert count_flops(model, convention="official").gflops == count_flops(model).gflops
    with pytest.raises(UserError, match="convention"):
        count_flops(model, convention="paper")
    with pytest.raises(UserError, match="torch counter"):
        count_flops(_tiny_model("uvit", "cpu"), counter="fvcore", convention="official")


def run_in_fresh_python(code: str) -> str:
    """``python -c code`` in a new interpreter at the repository root (what it imports is the point), which
    must print ``ok`` last; its stderr."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "ok", result.stderr
    return result.stderr


def test_meta_count_leaves_dynamo_unimported_and_usable():
    """zoo.meta keeps Dynamo's 1–3 s import out of `zoo build --flops`, and undoes itself."""
    code = (
        "import sys, torch\n"
        "from zoo.flops import count_recipe_flops\n"
        "from zoo.cli import main\n"
        "r = count_recipe_flops('recipes/dit_s_2.yaml')\n"
        "assert round(r.gflops, 2) == 6.06, r.gflops\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        # the command's checks too, for each family (U-ViT's example timesteps were rand * 999: a scalar
        # multiply on meta imported Dynamo and put zoo build of every U-ViT recipe over 5 s)
        "for name in ('uvit_m_4', 'dimr_m_3r', 'dit_s_2'):\n"
        "    assert main(['build', f'recipes/{name}.yaml', '--flops']) == 0\n"
        "    assert 'torch._dynamo' not in sys.modules, name\n"
        "import torch._dynamo\n"
        "assert callable(torch._dynamo.disable) and torch._dynamo.is_compiling() is False\n"
        "print('ok')\n"
    )
    run_in_fresh_python(code)


def test_flop_counter_is_imported_without_triton_and_quietly():
    """torch.utils.flop_counter imported Triton (0.2 s CPU, 0.3-0.5 s wall of each zoo build --flops) for kernels
    zoo's models do not hold. Without it the counts are the same, no "triton not found" warning is printed, and
    sys.modules' triton entries are what they were: absent in a fresh process, the real modules after an import."""
    code = (
        "import sys, torch\n"
        "from zoo.flops import count_recipe_flops\n"
        "assert 'triton' not in sys.modules\n"
        "r = count_recipe_flops('recipes/dit_s_2.yaml')\n"
        "assert round(r.gflops, 2) == 6.06, r.gflops\n"
        "assert 'torch.utils.flop_counter' in sys.modules and not any(k.split('.')[0] == 'triton' for k in sys.modules)\n"
        "print('ok')\n"
    )
    assert "triton" not in run_in_fresh_python(code)


def test_no_triton_import_restores_sys_modules(monkeypatch):
    import importlib
    import sys

    from zoo.meta import no_triton_import

    monkeypatch.delitem(sys.modules, "triton", raising=False)  # as in a process that has not imported it
    monkeypatch.setattr("zoo.meta.threading.active_count", lambda: 1)  # a thread an earlier test left: it stands aside
    with no_triton_import():
        assert sys.modules["triton"] is None
        with pytest.raises(ImportError):
            importlib.import_module("triton")
    assert "triton" not in sys.modules
    stand_in = object()  # already imported (here: anything): left as it was
    monkeypatch.setitem(sys.modules, "triton", stand_in)
    with no_triton_import():
        assert sys.modules["triton"] is stand_in
    assert sys.modules["triton"] is stand_in


def test_repeated_block_memo_changes_no_count(monkeypatch):
    """Counting each distinct block once (zoo.meta.RepeatedBlockMemo) gives the full per-module counts."""
    import contextlib

    import zoo.flops

    from zoo.meta import build_on_meta

    model = build_on_meta(lambda: zoo.build_model(Path(__file__).parent.parent / "recipes" / "dimr_m_3r.yaml"))
    fast = count_flops(model, max_depth=9)
    monkeypatch.setattr(zoo.flops, "RepeatedBlockMemo", lambda model, counter: contextlib.nullcontext())
    slow = count_flops(model, max_depth=9)
    assert fast.gflops == slow.gflops and fast.by_module == slow.by_module
    assert len(fast.by_module) > 300  # every block's sub-modules are there


def test_output_check_runs_each_repeated_block_once_and_still_refuses_a_wrong_shape(monkeypatch):
    """zoo build / zoo train's output check ran all 12 blocks of DiT-S on meta (the XL recipes' 30-40 per branch):
    with the memo in its counter-free mode the first block runs and the other 11 reuse its output shape."""
    from zoo.blocks.transformer import TransformerBlock
    from zoo.meta import build_on_meta
    from zoo.training.fit import training_objective

    calls = []
    forward = TransformerBlock.forward
    monkeypatch.setattr(TransformerBlock, "forward", lambda self, *a, **k: calls.append(self) or forward(self, *a, **k))
    recipe = zoo.load_recipe("dit_s_2")
    model = build_on_meta(lambda: zoo.build_model(recipe))
    training_objective(recipe, model)
    assert len(model.blocks) == 12 and calls == [model.blocks[0]]
    assert not any("forward" in vars(block) for block in model.blocks)  # the memo's wrappers are gone

    calls.clear()
    recipe = zoo.load_recipe("dit_s_2", ["model.learn_sigma=false"])  # 4 channels out: hybrid_vlb needs 8
    model = build_on_meta(lambda: zoo.build_model(recipe))
    with pytest.raises(UserError, match="the hybrid objective needs a learned-sigma output with 8 channels, got "
                       r"\(1, 4, 32, 32\)"):
        training_objective(recipe, model)
    assert calls == [model.blocks[0]]


def test_repeated_block_memo_tells_blocks_apart_by_private_settings():
    """Blocks differing only in a private attribute (``self._keep``) shared one memo entry: the second
    block's output took the first one's shape, which zoo build's output check relies on."""
    from zoo.meta import RepeatedBlockMemo

    class Slice(torch.nn.Module):
        def __init__(self, keep: int):
            super().__init__()
            self.lin, self._keep = torch.nn.Linear(4, 4), keep

        def forward(self, x):
            return self.lin(x)[..., : self._keep]

    model = torch.nn.ModuleList([Slice(4), Slice(3)]).to("meta")
    x = torch.zeros(2, 4, device="meta")
    with RepeatedBlockMemo(model, None):
        shapes = [tuple(block(x).shape) for block in model]
    assert shapes == [(2, 4), (2, 3)]

    class Repeat(torch.nn.Module):  # a private setting that is no plain value: a tuple
        def __init__(self, reps: int):
            super().__init__()
            self.lin, self._plan = torch.nn.Linear(16, 16, bias=False), (reps,)

        def forward(self, x):
            for _ in range(self._plan[0]):
                x = self.lin(x)
            return x

    expected = 2 * 16 * 16 * (1 + 5) / 1e9  # taken for one block repeated: 1024 multiply-adds, not 3072
    with torch.device("meta"):
        on_meta = torch.nn.Sequential(Repeat(1), Repeat(5))
    assert count_flops(on_meta, (torch.zeros(2, 16, device="meta"),)).gflops == pytest.approx(expected, rel=1e-12)


def test_repeated_block_memo_tells_blocks_apart_by_settings_that_are_not_plain():
    """Two blocks that differed only in a dict setting were taken for repeats on meta: 512 MACs, not 1536."""
    import enum

    class Times(enum.Enum):
        ONCE, FIVE = 1, 5

    class LoopBlock(torch.nn.Module):  # a plugin's block keeping its settings in a dict and an enum
        def __init__(self, n: int, how: Times):
            super().__init__()
            self.lin, self.cfg, self.how = torch.nn.Linear(16, 16, bias=False), {"n": n}, how

        def forward(self, x):
            for _ in range(self.cfg["n"] * self.how.value):
                x = self.lin(x)
            return x

    def build():
        return torch.nn.Sequential(LoopBlock(1, Times.ONCE), LoopBlock(5, Times.ONCE), LoopBlock(1, Times.FIVE),
                                   LoopBlock(1, Times.ONCE))

    x = torch.zeros(2, 16)
    expected = 2 * 16 * 16 * (1 + 5 + 5 + 1) / 1e9
    assert count_flops(build(), (x,)).gflops == pytest.approx(expected, rel=1e-12)
    with torch.device("meta"):
        on_meta = build()
    assert count_flops(on_meta, (x.to("meta"),)).gflops == pytest.approx(expected, rel=1e-12)


def test_a_plugin_whose_example_inputs_are_on_cpu_is_counted_on_meta(tmp_path, capsys):
    """zoo build --flops built it on meta and ran it on the cpu inputs: a torch traceback, exit 1."""
    from zoo.cli import main
    from zoo.meta import build_on_meta

    expected = count_flops(_CpuInputsNet())
    assert count_flops(build_on_meta(_CpuInputsNet)).gflops == expected.gflops == pytest.approx(12 * 12 / 1e9)
    recipe = tmp_path / "net.yaml"
    recipe.write_text(f"model: {{_target_: {__name__}._CpuInputsNet}}\n")
    assert main(["build", str(recipe), "--flops", "--json"]) == 0
    assert '"gflops": 1.44e-07' in capsys.readouterr().out
    # example_inputs that cannot run on meta: the one line the model's own forward gets there
    with pytest.raises(UserError, match=r"_ItemInputsNet cannot run on the meta device \(RuntimeError at "
                       r"test_flops.py:\d+: .*\(count on real tensors: zoo build --flops --device cpu"):
        count_flops(build_on_meta(_ItemInputsNet))
    assert count_flops(_ItemInputsNet()).gflops == expected.gflops



def test_every_user_of_example_inputs_gets_them_on_the_models_device():
    """The FLOP count alone made them under the model's device: zoo train's output check (and the memory
    estimate) ran a meta model on the plugin's cpu inputs, failed, and skipped the check without a word."""
    from zoo.meta import build_on_meta, example_inputs

    x, t, y = example_inputs(build_on_meta(_CpuInputsNet), 2)
    assert x.is_meta and t.is_meta and y.is_meta and tuple(x.shape) == (2, 3, 2, 2)
    assert not example_inputs(_CpuInputsNet(), 2)[0].is_meta

def test_inputs_and_model_on_meta_and_off_it_are_named_as_such():
    model = _Convs()
    with pytest.raises(UserError, match=r"^the inputs are on meta and the model on cpu: .*\(make the inputs on "):
        count_flops(model, torch.randn(1, 3, 8, 8, device="meta"))
    with pytest.raises(UserError, match=r"^the inputs are on cpu and the model on meta: .*\(move the inputs to meta"):
        count_flops(model.to("meta"), torch.randn(1, 3, 8, 8))


def test_fvcore_refuses_a_compiled_model_in_one_line():
    model = torch.compile(_Convs())  # jit.trace of Dynamo's frames: a RuntimeError from deep inside fvcore
    with pytest.raises(UserError, match=r"fvcore counter cannot trace a torch.compile'd model .*counter='torch'"):
        count_flops(model, torch.randn(1, 3, 8, 8), counter="fvcore")
