"""A CPU's key name over a corpus of real descriptions: bounded, valid in every key, distinct for CPUs that
time differently, stable for one CPU; and caches written with the previous names keep their winners."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from sae_tune import cpu_identity
from sae_tune.autotune.search import STUDY_NAME_MAX, study_name
from sae_tune.cache.share import matching_devices
from sae_tune.cache.store import CacheKey, Store, check_key_field
from sae_tune.cpu_identity import (
    KEY_NAME_MAX,
    READABLE_MAX,
    CpuDescription,
    bounded_name,
    describe_cpu,
    legacy_key_name,
    parse_cpuinfo,
    parse_sysctl,
    read_sysctl,
)
from sae_tune.device import device_slug, gpu_key_name

CORPUS = Path(__file__).parent / "cpu_corpus"
LINUX = sorted(p.name for p in CORPUS.glob("*.cpuinfo"))
MACOS = sorted(p.name for p in CORPUS.glob("*.sysctl"))
ARM_FILES = {"graviton2.cpuinfo", "graviton3.cpuinfo", "graviton4.cpuinfo", "ampere-altra.cpuinfo"}


def sysctl_values(name: str) -> dict[str, str]:
    values = {}
    for line in (CORPUS / name).read_text().splitlines():
        key, _, value = line.partition(":")
        values[key.strip()] = value.strip()
    return values


def fake_sysctl(values: dict[str, str]):
    """A stand-in for running ``sysctl -n KEY``: prints the value, or nothing for a key macOS lacks."""

    def run(args: list[str]) -> str:
        assert args[:2] == ["sysctl", "-n"], args
        return values.get(args[2], "") + ("\n" if args[2] in values else "")

    return run


def description(name: str) -> CpuDescription:
    if name.endswith(".sysctl"):
        machine = "arm64" if "m2" in name else "x86_64"
        return describe_cpu(system="Darwin", machine=machine, sysctl=fake_sysctl(sysctl_values(name)))
    machine = "aarch64" if name in ARM_FILES else "x86_64"
    return describe_cpu(CORPUS / name, system="Linux", machine=machine)


def test_the_corpus_covers_the_machines_users_have():
    assert len(LINUX) >= 14 and len(MACOS) >= 2, (LINUX, MACOS)


@pytest.mark.parametrize("name", LINUX + MACOS)
def test_every_description_yields_a_valid_bounded_key(name):
    desc = description(name)
    key = desc.key_name
    assert 0 < len(key) <= KEY_NAME_MAX, key
    assert len(desc.readable) <= READABLE_MAX
    assert key == key.strip() and key.isprintable()
    assert check_key_field("device_name", key) == key  # the cache accepts it
    # every derived name stays within its bound too
    cache_key = CacheKey(key, None, "2.13.0", None, "c" * 64, "decode", "float32", 65536, 2304, 1024, 128)
    assert len(study_name(cache_key)) <= STUDY_NAME_MAX
    assert check_key_field("device_name", cache_key.device_name)
    slug = device_slug(key)
    assert slug and len(slug) <= 100 and all(c.isalnum() or c == "_" for c in slug)
    # one CPU always gets the same key: read again, and with its flags listed in another order
    assert description(name).key_name == key
    shuffled = CpuDescription(desc.model, desc.arch, desc.vendor, desc.generation, frozenset(desc.extensions))
    assert shuffled.key_name == key


def test_descriptions_read_what_times_kernels_differently():
    spr = description("intel-sapphire-rapids.cpuinfo")
    assert spr.readable == "Intel(R) Xeon(R) Platinum 8488C"
    assert spr.generation == "family 6 model 143 stepping 8"
    assert {"avx512_fp16", "amx_bf16", "amx_tile", "amx_int8", "avx512_bf16"} <= spr.extensions
    g3 = description("graviton3.cpuinfo")
    assert g3.readable == "ARM Neoverse-V1" and g3.vendor == "0x41"
    assert {"sve", "bf16", "i8mm", "asimdhp"} <= g3.extensions
    assert "sve2" in description("graviton4.cpuinfo").extensions
    assert description("graviton2.cpuinfo").readable == "ARM Neoverse-N1"
    bare = description("vm-bare.cpuinfo")
    assert bare.extensions == frozenset() and bare.readable  # nothing but a vendor: still a name
    m2 = description("macos-m2.sysctl")
    assert m2.readable == "Apple M2 Pro" and {"asimd", "bf16", "i8mm"} <= m2.extensions
    assert "sme" not in m2.extensions  # listed as 0
    mac_intel = description("macos-intel.sysctl")
    assert {"avx2", "fma", "f16c"} <= mac_intel.extensions and "avx512f" not in mac_intel.extensions
    assert mac_intel.generation.startswith("family 6 model 158 stepping 13")


def test_cpus_that_differ_get_different_keys():
    keys = {name: description(name).key_name for name in LINUX + MACOS}
    # Graviton2 and Ampere Altra are the same core (Neoverse-N1 r3p1) and Linux describes them alike
    same = {("ampere-altra.cpuinfo", "graviton2.cpuinfo")}
    for a, b in itertools.combinations(sorted(keys), 2):
        if (a, b) in same:
            assert keys[a] == keys[b]
        else:
            assert keys[a] != keys[b], (a, b)
    # one extension more or a newer stepping is another key, though the model name is the same
    zen4 = description("amd-zen4.cpuinfo")
    for changed in (
        CpuDescription(
            zen4.model, zen4.arch, zen4.vendor, zen4.generation, zen4.extensions | {"avx512_fp16"}
        ),
        CpuDescription(zen4.model, zen4.arch, zen4.vendor, "family 25 model 17 stepping 2", zen4.extensions),
        CpuDescription(zen4.model, "aarch64", zen4.vendor, zen4.generation, zen4.extensions),
    ):
        assert changed.key_name != zen4.key_name and changed.readable == zen4.readable


def test_a_long_unicode_model_name_is_cut_readably_and_kept_distinct():
    desc = description("unicode-200.cpuinfo")
    assert len(desc.model) == 200
    assert desc.readable.startswith("Ünïcödé Prozessor 量子") and desc.readable.endswith("…")
    assert len(desc.key_name) <= KEY_NAME_MAX
    other = CpuDescription(desc.model[:-1] + "X", desc.arch, desc.vendor, desc.generation, desc.extensions)
    assert other.readable == desc.readable and other.key_name != desc.key_name
    hostile = CpuDescription("a\x00b\u202ec [x] \n d" * 40, "x86_64", "", "", frozenset())
    assert hostile.key_name.isprintable() and check_key_field("device_name", hostile.key_name)


def test_the_key_name_that_was_refused_now_fits():
    """The name the previous release gave a Sapphire Rapids (141 characters) was refused by the cache."""
    text = (CORPUS / "intel-sapphire-rapids.cpuinfo").read_text()
    legacy = legacy_key_name(text, "x86_64")
    assert len(legacy) > 128
    key = description("intel-sapphire-rapids.cpuinfo").key_name
    assert len(key) <= 64 and check_key_field("device_name", key) == key


def test_read_sysctl_asks_for_each_key_and_skips_the_ones_macos_lacks():
    asked = []

    def run(args):
        asked.append(args[2])
        if args[2] == "hw.optional.avx2_0":
            raise OSError("sysctl: unknown oid")
        return {"machdep.cpu.brand_string": "Apple M1\n", "hw.optional.neon": "1\n"}.get(args[2], "")

    values = read_sysctl(run)
    assert values == {"machdep.cpu.brand_string": "Apple M1", "hw.optional.neon": "1"}
    assert set(asked) == set(cpu_identity.SYSCTL_KEYS)
    assert parse_sysctl(values, "arm64").key_name.startswith("Apple M1 [arm64 ")


def test_no_description_at_all_still_names_the_cpu(tmp_path):
    desc = describe_cpu(tmp_path / "missing", system="Linux", machine="riscv64")
    assert desc.key_name and check_key_field("device_name", desc.key_name)
    assert parse_cpuinfo("", "x86_64").key_name != parse_cpuinfo("", "aarch64").key_name


def test_bounded_names_keep_distinct_long_names_apart():
    a, b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(bounded_name(a, 100)) == 100 and bounded_name(a, 100) != bounded_name(b, 100)
    assert bounded_name("short", 100) == "short"
    assert len(gpu_key_name("NVIDIA " + "H" * 500)) <= 96
    assert gpu_key_name("  NVIDIA   GeForce RTX 4090 ") == "NVIDIA GeForce RTX 4090"


# --- caches written with the previous names ----------------------------------------------------------


def _winner_key(device_name: str, bucket: int = 32) -> CacheKey:
    return CacheKey(device_name, None, "2.13.0", None, "t" * 16, "decode", "float32", 4096, 256, bucket, 64)


def _store_winner(store: Store, key: CacheKey, ms: float) -> None:
    store.record_trial(key, "dense", {}, ms, study="s")
    store.set_winner_if_faster(key, "dense", {}, ms, dense_ms=ms)


def test_a_cache_written_with_the_legacy_name_is_migrated_keeping_its_winners(tmp_path, monkeypatch):
    legacy = "AMD EPYC [family 26 model 2: sse4_2 avx avx2 fma f16c avx512f]"
    path = tmp_path / "cache.sqlite"
    with Store(path) as store:
        _store_winner(store, _winner_key(legacy, 32), 1.5)
        _store_winner(store, _winner_key(legacy, 64), 2.5)
        _store_winner(store, _winner_key("NVIDIA H100", 32), 0.5)
        assert store.devices() == [legacy, "NVIDIA H100"]
    current = "AMD EPYC [x86_64 0123456789ab]"
    monkeypatch.setattr(cpu_identity, "legacy_names", lambda: frozenset({legacy}))
    monkeypatch.setattr(cpu_identity, "cpu_key_name", lambda: current)
    monkeypatch.setattr("sae_tune.cache.store.legacy_names", lambda: frozenset({legacy}))
    monkeypatch.setattr("sae_tune.cache.store.cpu_key_name", lambda: current)
    # read-only readers (the dispatcher's index) see the current name before any migration
    from sae_tune.dispatch.index import read_local

    assert sorted((r.key.device_name, r.key.batch_bucket) for r in read_local(path))[:2] == [
        (current, 32),
        (current, 64),
    ]
    with Store(path) as store:
        assert store.devices() == [current, "NVIDIA H100"]
        winners = {w.key.batch_bucket: w for w in store.winners(current)}
        assert set(winners) == {32, 64} and winners[32].ms == 1.5
        assert winners[32].key == _winner_key(current, 32)  # re-keyed: its id follows the new name
        assert len(store.trials(_winner_key(current, 32))) == 1
        # export by model name, any case, still finds it
        assert matching_devices(store, "amd epyc") == [current]


def test_migration_keeps_the_faster_winner_where_both_names_have_one(tmp_path, monkeypatch):
    legacy, current = "Old CPU [family 1 model 2: avx]", "Old CPU [x86_64 0123456789ab]"
    path = tmp_path / "cache.sqlite"
    with Store(path) as store:
        _store_winner(store, _winner_key(legacy), 1.0)
        _store_winner(store, _winner_key(current), 3.0)
    monkeypatch.setattr("sae_tune.cache.store.legacy_names", lambda: frozenset({legacy}))
    monkeypatch.setattr("sae_tune.cache.store.cpu_key_name", lambda: current)
    with Store(path) as store:
        assert store.devices() == [current]
        assert [w.ms for w in store.winners(current)] == [1.0]
        assert len(store.trials(_winner_key(current))) == 2


def test_this_machines_legacy_name_is_derived_like_the_previous_release():
    text = (CORPUS / "amd-zen5.cpuinfo").read_text()
    assert legacy_key_name(text, "x86_64") == (
        "AMD EPYC 9R45 128-Core Processor [family 26 model 2: sse4_2 avx avx2 fma f16c avx512f avx512bw "
        "avx512vl avx512_bf16 avx_vnni]"
    )
    assert legacy_key_name((CORPUS / "graviton2.cpuinfo").read_text(), "aarch64", "") == (
        "aarch64 [aarch64: asimd fphp]"
    )


# --- the whole loop under other machines' descriptions -------------------------------------------------


@pytest.fixture
def pretend_cpu(monkeypatch):
    """Make this process describe its CPU as another machine does (every cached description cleared)."""
    from sae_tune.device import clear_device_cache
    from sae_tune.dispatch.identity import device_identity

    def pretend(name: str) -> CpuDescription:
        desc = description(name)
        monkeypatch.setattr(cpu_identity, "this_cpu", lambda: desc)
        clear_device_cache()
        device_identity.cache_clear()
        return desc

    yield pretend
    clear_device_cache()
    device_identity.cache_clear()


@pytest.mark.parametrize(
    "name", ["intel-sapphire-rapids.cpuinfo", "graviton3.cpuinfo", "vm-bare.cpuinfo", "unicode-200.cpuinfo"]
)
def test_tune_store_and_dispatch_round_trip_under_other_descriptions(name, pretend_cpu, tmp_path):
    import torch
    from conftest import assert_matches_dense, random_acts, random_weights

    from sae_tune.autotune.search import Tuner
    from sae_tune.dispatch import Dispatcher
    from sae_tune.specs import spec_from_shape

    desc = pretend_cpu(name)
    path = tmp_path / "cache.sqlite"
    with Store(path) as store:
        result = Tuner(spec_from_shape(1024, 64, 8), store=store, seed=1).tune_batch(16, trials=3)
        assert result.key.device_name == desc.key_name
        assert store.devices() == [desc.key_name]
        assert store.winner(result.key) is not None
    acts = random_acts(16, 1024, 8, torch.float32)
    W, b = random_weights(1024, 64, torch.float32)
    (tmp_path / "shipped").mkdir()
    dispatcher = Dispatcher(path, shipped_dir=tmp_path / "shipped")
    decision = dispatcher.explain(acts, W, b)
    assert decision.source == "cache", decision
    assert_matches_dense(dispatcher.decode(acts, W, b), acts, W, b)
