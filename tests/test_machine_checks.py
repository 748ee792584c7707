"""What zoo says about the machine and about files that are not what a command expects:
``gpu_suite.sh`` without a GPU, ``zoo parity`` on non-golden files, pipes closed early."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from zoo.cli import main
from zoo.errors import UserError
from zoo.torchfile import torch_load_plain

ROOT = Path(__file__).resolve().parents[1]


def _not_golden(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not golden files, and the words the message must contain."""
    (tmp_path / "random.pt").write_bytes(random.Random(1).randbytes(4096))
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as z:
        z.writestr("readme.txt", "not a torch file")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled nn.Module
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "state_dict.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "adir.pt").mkdir()
    return {
        "random": (tmp_path / "random.pt", "it is not a torch file"),
        "zip": (tmp_path / "plain.zip", "its zip archive cannot be read"),
        "module": (tmp_path / "module.pt", "a pickled Python object (torch.nn.modules.linear.Linear)"),
        "state_dict": (tmp_path / "state_dict.pt", "is not a golden file but a state dict"),
        "list": (tmp_path / "list.pt", "is not a golden file: it holds a list"),
        "empty": (tmp_path / "empty.pt", "the file is empty"),
        "directory": (tmp_path / "adir.pt", "it is a directory"),
        "missing": (tmp_path / "missing.pt", "does not exist"),
    }


def test_zoo_parity_on_files_that_are_not_golden_files(tmp_path: Path, capsys):
    for name, (path, words) in _not_golden(tmp_path).items():
        assert main(["parity", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (name, err)
        assert "config, state_dict, inputs and outputs" in err, (name, err)  # what it expected
        assert "weights_only" not in err and "Traceback" not in err, (name, err)


def test_random_bytes_are_always_called_not_a_torch_file(tmp_path: Path):
    """The unpickler fails on random bytes in many ways (empty stack, unknown memo key, bad UTF-8,
    a legacy magic number): every one of them must read as "not a torch file"."""
    rng = random.Random(0)
    path = tmp_path / "random.pt"
    for _ in range(2000):  # ~9% of random files hit a non-UnpicklingError path
        path.write_bytes(rng.randbytes(rng.choice([16, 256, 4096])))
        with pytest.raises(UserError) as info:
            torch_load_plain(path, "golden file")
        assert str(info.value).endswith("it is not a torch file (unreadable pickle data)"), str(info.value)


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_torch_files_are_told_apart_from_garbage(tmp_path: Path, protocol: int):
    """Pre-zip torch files start with the pickled magic number: their errors name what is wrong with
    them, never "not a torch file"."""
    legacy = dict(_use_new_zipfile_serialization=False, pickle_protocol=protocol)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt", **legacy)
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt", **legacy)
    data = (tmp_path / "sd.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    messages = {}
    for name in ("module", "cut"):
        with pytest.raises(UserError) as info:
            torch_load_plain(tmp_path / f"{name}.pt", "checkpoint")
        messages[name] = str(info.value)
    if protocol == 2:
        assert messages["module"].endswith("pickled Python object (torch.nn.modules.linear.Linear), "
                                           "not only tensors and plain data")
        assert messages["cut"].endswith("the file is empty or truncated")
        assert torch_load_plain(tmp_path / "sd.pt", "checkpoint").keys() == {"weight", "bias"}
    else:  # torch's safe unpickler has no FRAME opcode: such a file cannot be read safely at all
        assert all("legacy (pre-zip) torch file pickled with protocol 4 or 5" in m for m in messages.values())


def test_torch_load_errors_never_repeat_pytorchs_weights_only_false_advice(tmp_path: Path):
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(Exception) as info:
        torch.load(tmp_path / "pickled.pt", weights_only=True)
    assert "weights_only` set to `False`" in str(info.value)  # PyTorch's advice, which zoo must not pass on
    with pytest.raises(Exception) as info:
        torch_load_plain(tmp_path / "pickled.pt", "checkpoint")
    assert str(info.value) == (f"cannot read checkpoint {tmp_path / 'pickled.pt'}: it holds a pickled Python "
                               "object (torch.nn.modules.linear.Linear), not only tensors and plain data")  # fmt: skip


@pytest.mark.parametrize("args", [["list"], ["build", "recipes/dit_s_2.yaml", "--flops"]], ids=["list", "build"])
def test_output_into_a_pipe_closed_early_ends_quietly(args: list[str]):
    """``zoo ... | head -1`` where head has gone before zoo writes: exit 0, nothing on stderr."""
    code = "import sys; from zoo.cli import console_main; sys.argv = ['zoo', *sys.argv[1:]]; console_main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # the reader is gone: every write to the pipe fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err[-2000:]


def test_a_command_that_leaves_a_thread_pool_running_still_exits():
    """A first (uncached) train.compile leaves inductor's ThreadPoolExecutor workers waiting for work:
    the exit joined them without telling the pool to stop, and `zoo train` hung forever after 'done'."""
    code = ("import concurrent.futures, threading\n"
            "from zoo.cli import _exit_without_teardown\n"
            "pool = concurrent.futures.ThreadPoolExecutor(2)\n"
            "assert pool.submit(lambda: 1).result() == 1\n"
            "done = threading.Thread(target=lambda: None); done.start()  # a plain non-daemon thread is joined\n"
            "import atexit; atexit.register(print, 'atexit ran')\n"
            "_exit_without_teardown(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and proc.stdout == "atexit ran\n", proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_suite_without_a_gpu_says_so_and_exits_0():
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines() == [
        "gpu_suite: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to run"
    ]


def test_a_zip_torch_file_cut_anywhere_is_truncated_or_corrupt(tmp_path: Path):
    """A cut that leaves the archive's local headers readable makes torch seek past the end
    (OSError 22, "Invalid argument"): it reads as truncated like every other cut."""
    torch.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    for cut in (100, 1000, 5000, 10000, len(data) - 100):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(UserError) as info:
            torch_load_plain(tmp_path / "cut.pt", "checkpoint")
        assert str(info.value).endswith("it is truncated or corrupt (its zip archive cannot be read)"), (cut, info.value)
