"""Suite-wide switches for checking that the numeric tests hold on any CPU.

    ZOO_DETERMINISTIC=1 pytest        # torch.use_deterministic_algorithms(True) for the whole run
    ZOO_SIN_ULP=1 pytest              # every float32 sin/cos argument moved 1 ulp up (-1: down)
    ATEN_CPU_CAPABILITY=default pytest   # (torch's own switch) scalar kernels instead of AVX2/AVX-512
    ZOO_MP_START=forkserver pytest    # DataLoader workers started as Python 3.14 starts them on Linux

Float32 sinusoids differ between CPUs: another CPU's ``exp`` may round a frequency one ulp the
other way, which moves ``t * f`` by about one ulp of the argument. ``ZOO_SIN_ULP`` makes this
machine behave like such a CPU, so a float32 tolerance derived in a test can be checked
against the error it is meant to cover (see tests/numerics.py).

The suite checks CPU arithmetic, so it hides any GPU from itself and from the processes it starts
(``zoo train`` would otherwise pick CUDA, with TF32 matmuls, and two test ranks would share one
GPU): every tolerance here is derived for the CPU. The GPU checks are ``benchmarks/gpu_suite.sh``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

# Before anything initialises CUDA: torch reads these when it first looks for a device.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["HIP_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("ZOO_DETERMINISTIC", "") not in ("", "0"):
        torch.use_deterministic_algorithms(True)
    if os.environ.get("ZOO_MP_START"):  # fork (Linux up to Python 3.13), forkserver (3.14), spawn (macOS)
        multiprocessing.set_start_method(os.environ["ZOO_MP_START"], force=True)
    # A suite started as a script's background job (`pytest &`, nohup) ignores SIGINT, and the runs it
    # starts would inherit that: the tests that stop a run with Ctrl-C's signal test zoo, not the shell.
    for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, handler)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"deterministic {torch.are_deterministic_algorithms_enabled()}, "
        f"float32 sin/cos arguments shifted {os.environ.get('ZOO_SIN_ULP', '0')} ulp, "
        f"processes started by {multiprocessing.get_start_method()}"
    ]


@pytest.fixture(autouse=True)
def _sin_ulp_shift(monkeypatch: pytest.MonkeyPatch):
    """With ``ZOO_SIN_ULP=N``, float32 ``torch.sin``/``torch.cos`` see their argument N ulps away."""
    ulps = int(os.environ.get("ZOO_SIN_ULP", "0") or 0)
    if ulps:
        from numerics import shift_sinusoid_arguments

        with shift_sinusoid_arguments(ulps):
            yield
    else:
        yield


@pytest.fixture
def one_thread():
    """Tiny models run on one thread: extra threads only add overhead, and a machine whose other
    core is busy makes 2-thread tiny ops up to 20x slower. Use with ``pytestmark``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def isolated_eval(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """A private zoo cache and no Inception weights from the environment: eval tests see only what they build."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ZOO_INCEPTION_WEIGHTS", raising=False)


@pytest.fixture
def register_extractor():
    """``register_extractor(name, cls)`` registers a test feature extractor for one test only."""
    import zoo

    names = []

    def register(name: str, cls: type) -> None:
        zoo.register("extractor", name)(cls)
        names.append(name)

    yield register
    for name in names:
        zoo.registry.unregister("extractor", name)
