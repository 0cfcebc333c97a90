import pytest
import torch

from sae_tune.targets.triton.variant import TILE_ELEMS_PER_THREAD, Variant


def test_defaults_and_examples_from_the_docs_are_valid():
    assert Variant(alloc="exact").alloc == "exact"
    assert Variant().alloc == "chunked" and not Variant().host_sync
    v = Variant(alloc="fixed", overflow="fallback", max_l0=16, block_l=8)
    assert (v.max_l0, v.block_l, v.overflow) == (16, 8, "fallback")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"alloc": "sparse"}, ValueError),
        ({"alloc": "fixed", "overflow": "ignore"}, ValueError),
        ({"block_d": 100}, ValueError),
        ({"block_d": "256"}, TypeError),
        ({"block_d": 256.0}, TypeError),
        ({"block_l": True}, TypeError),
        ({"block_f": 128}, ValueError),
        ({"block_f": 16384}, ValueError),
        ({"num_warps": 3}, ValueError),
        ({"num_stages": 0}, ValueError),
        ({"alloc": "fixed", "max_l0": 0}, ValueError),
        ({"alloc": "fixed", "max_l0": "128; import os"}, TypeError),
        ({"alloc": "exact", "max_l0": 64}, ValueError),
        ({"alloc": "exact", "overflow": "unchecked"}, ValueError),
        ({"alloc": ["fixed"]}, ValueError),
        ({"alloc": "exact", "chunk_slots": 16}, ValueError),
        ({"alloc": "fixed", "unit_chunks": 2}, ValueError),
        ({"alloc": "chunked", "max_l0": 64}, ValueError),
        ({"alloc": "chunked", "overflow": "unchecked"}, ValueError),
        ({"chunk_slots": 3}, ValueError),
        ({"chunk_slots": 128}, ValueError),
        ({"unit_chunks": 0}, ValueError),
    ],
)
def test_invalid_fields_are_rejected_with_the_field_named(kwargs, error):
    with pytest.raises(error) as info:
        Variant(**kwargs)
    assert any(name in str(info.value) for name in kwargs)


def test_from_dict_round_trip_and_unknown_keys():
    v = Variant(alloc="fixed", overflow="validate", max_l0=64, block_d=128, num_warps=8)
    assert Variant.from_dict(v.to_dict()) == v
    assert Variant.from_dict(Variant().to_dict()) == Variant()
    with pytest.raises(ValueError, match="evil"):
        Variant.from_dict({**v.to_dict(), "evil": "__import__('os')"})
    with pytest.raises(TypeError):
        Variant.from_dict([("alloc", "exact")])


def test_host_sync_says_which_variants_wait_for_the_device():
    assert Variant(alloc="exact").host_sync
    assert Variant(alloc="fixed", overflow="validate").host_sync
    assert not Variant(alloc="fixed", overflow="fallback").host_sync
    assert not Variant(alloc="fixed", overflow="unchecked").host_sync
    assert not Variant().host_sync and not Variant(chunk_slots=64, unit_chunks=1).host_sync


def test_fields_of_other_allocations_are_left_out_of_the_dict():
    assert set(Variant().to_dict()) >= {"chunk_slots", "unit_chunks"}
    assert "max_l0" not in Variant().to_dict() and "overflow" not in Variant().to_dict()
    assert "chunk_slots" not in Variant(alloc="exact").to_dict()
    assert (
        "chunk_slots" not in Variant(alloc="fixed").to_dict() and "max_l0" in Variant(alloc="fixed").to_dict()
    )
    # a record written before the chunked family (no chunk fields) still reads back
    assert Variant.from_dict({"alloc": "exact", "block_l": 8}).name.startswith("exact-")


def test_can_truncate_only_for_unchecked_fixed():
    assert Variant(alloc="fixed", overflow="unchecked").can_truncate
    assert not Variant(alloc="fixed", overflow="fallback").can_truncate
    assert not Variant(alloc="fixed", overflow="validate").can_truncate
    assert not Variant().can_truncate


@pytest.mark.parametrize("F, D", [(256, 64), (16384, 768), (65536, 2304), (1000, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_search_space_respects_shape_caps_and_register_budget(F, D, dtype):
    space = Variant.search_space(F, D, dtype)
    assert space, "the space is never empty"
    assert len({v.name for v in space}) == len(space), "names identify variants"
    for v in space:
        assert v.block_d <= max(32, 1 << (D - 1).bit_length())
        assert v.block_f <= max(256, 1 << (F - 1).bit_length())
        assert v.block_l * v.block_d <= TILE_ELEMS_PER_THREAD * 32 * v.num_warps
        assert not v.can_truncate
    assert {v.alloc for v in space} == {"chunked", "exact", "fixed"}
    assert Variant() in space or F < 65536, "the default is a point of the gemma-shaped space"


def test_unchecked_only_on_request():
    space = Variant.search_space(4096, 512, allow_unchecked=True, max_l0s=(32,))
    assert any(v.can_truncate for v in space)
    assert {v.max_l0 for v in space if v.alloc == "fixed"} == {32}


def test_search_space_rejects_bad_arguments():
    with pytest.raises(ValueError):
        Variant.search_space(0, 10)
    with pytest.raises(TypeError):
        Variant.search_space(10, 10, torch.int32)
