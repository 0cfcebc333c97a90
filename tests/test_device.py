"""Device identity: the first part of every cache key, so it must be stable, cached and honest."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from sae_tune import cpu_identity
from sae_tune import device as device_mod
from sae_tune.device import (
    DeviceInfo,
    clear_device_cache,
    cpu_key_name,
    cpu_model_name,
    describe_device,
    device_slug,
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_device_cache()
    yield
    clear_device_cache()


def test_cpu_description_matches_this_process():
    info = describe_device("cpu")
    assert info.kind == "cpu"
    assert info.capability is None
    assert info.name and info.name == info.name.strip()
    assert info.torch_version == torch.__version__
    try:
        import triton
    except ImportError:
        assert info.triton_version is None
    else:
        assert info.triton_version == triton.__version__


def test_description_is_cached_per_device():
    a = describe_device("cpu")
    assert describe_device(torch.device("cpu")) is a
    clear_device_cache()
    assert describe_device("cpu") == a


def test_frozen():
    info = describe_device("cpu")
    with pytest.raises(AttributeError):
        info.name = "other"  # type: ignore[misc]


def test_cpu_model_from_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t:   Intel(R)  Xeon(R) CPU @ 2.20GHz\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n"
    )
    assert cpu_model_name(cpuinfo) == "Intel(R) Xeon(R) CPU @ 2.20GHz"


def test_cpu_model_falls_back_to_platform(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_identity.platform, "processor", lambda: "  arm  ")
    assert cpu_model_name(tmp_path / "missing") == "arm"
    (tmp_path / "no-model").write_text("processor\t: 0\nCPU part\t: 0xd0c\n")
    assert cpu_model_name(tmp_path / "no-model") == "arm"
    monkeypatch.setattr(cpu_identity.platform, "processor", lambda: "")
    monkeypatch.setattr(cpu_identity.platform, "machine", lambda: "aarch64")
    assert cpu_model_name(tmp_path / "missing") == "aarch64"


def test_triton_missing_gives_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    assert device_mod.triton_version() is None
    assert describe_device("cpu").triton_version is None


def test_cuda_path_is_thin_and_cached(monkeypatch):
    calls = []

    def name(index):
        calls.append(index)
        return "NVIDIA  GeForce RTX 4090"

    monkeypatch.setattr(torch.cuda, "get_device_name", name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 9))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    info = describe_device("cuda")
    assert info == DeviceInfo(
        kind="cuda",
        name="NVIDIA GeForce RTX 4090",
        capability="8.9",
        torch_version=torch.__version__,
        triton_version=device_mod.triton_version(),
    )
    assert describe_device("cuda:0") is info
    assert calls == [0]


def test_unsupported_device_type():
    with pytest.raises(ValueError, match="unsupported device type 'meta'"):
        describe_device("meta")


def test_device_slug():
    assert device_slug("NVIDIA GeForce RTX 4090") == "NVIDIA_GeForce_RTX_4090"
    assert device_slug("Intel(R) Xeon(R) CPU @ 2.20GHz") == "Intel_R_Xeon_R_CPU_2_20GHz"
    assert device_slug("../..") == "unknown"


def test_cpu_key_name_names_the_generation_and_vector_extensions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
        "flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f\n"
    )
    first = cpu_key_name(cpuinfo)
    assert re.fullmatch(r"AMD EPYC \[\S+ [0-9a-f]{12}\]", first), first
    cpuinfo.write_text("model name\t: AMD EPYC\ncpu family\t: 26\nmodel\t\t: 2\nflags\t\t: avx2 fma\n")
    assert cpu_key_name(cpuinfo) != first and cpu_key_name(cpuinfo).startswith("AMD EPYC [")
    assert describe_device("cpu").name.startswith(cpu_model_name() + " [")
