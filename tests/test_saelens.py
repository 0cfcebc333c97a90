"""SAELens SAEs decode through the dispatcher after ``import sae_tune``; everything around the decoder
matmul (hooks, normalisation, reshaping, gradients) behaves as before. Real SAELens classes, built
offline from configs with random weights and thresholds that fire about 1% of the features."""

import functools
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TOLERANCE

sae_lens = pytest.importorskip("sae_lens")

import sae_tune  # noqa: E402
from sae_tune.cache.store import CacheKey, Store  # noqa: E402
from sae_tune.device import describe_device  # noqa: E402
from sae_tune.dispatch import reload  # noqa: E402
from sae_tune.integrations.saelens import is_patched  # noqa: E402
from sae_tune.targets import by_name, templates_hash  # noqa: E402

ARCHS = ("jumprelu", "topk", "standard", "gated")
SHAPES = [(4096, 256), (16384, 768)]
FIRE_Z = 2.33  # a standard normal pre-activation exceeds this 1% of the time
BATCH = 8


def make_sae(arch: str, F: int, D: int, dtype: torch.dtype, seed: int = 0, z: float = FIRE_Z, **cfg):
    name = str(dtype).removeprefix("torch.")
    if arch == "jumprelu":
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=F, dtype=name, **cfg))
    elif arch == "topk":
        k = max(1, round(F * math.erfc(z / math.sqrt(2)) / 2))  # as many as the other archs fire
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D, d_sae=F, k=k, dtype=name, **cfg))
    elif arch == "gated":
        sae = sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D, d_sae=F, dtype=name, **cfg))
    else:
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=F, dtype=name, **cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=gen) / D**0.5)
        sae.W_dec.copy_(torch.randn(F, D, generator=gen) / 8)
        sae.b_dec.copy_(torch.randn(D, generator=gen) / 10)
        if arch == "jumprelu":
            sae.threshold.fill_(z)
        elif arch == "standard":
            sae.b_enc.fill_(-z)
        elif arch == "gated":  # the gate opens where the pre-activation exceeds z; magnitudes are ReLU'd
            sae.b_gate.fill_(-z)
            sae.b_mag.zero_()
            sae.r_mag.zero_()
    return sae


@functools.lru_cache(maxsize=4)
def shared_sae(arch: str, F: int, D: int, dtype: torch.dtype, z: float = FIRE_Z):
    """An SAE reused by tests that neither hook nor train it (building a wide one takes a while)."""
    return make_sae(arch, F, D, dtype, z=z)


def inputs(D: int, dtype: torch.dtype, shape=(BATCH,), seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def record_winner(path, impl, config, sae, batch=BATCH):
    key = CacheKey.for_device(
        describe_device("cpu"),
        template_hash=templates_hash(),
        dtype=sae.W_dec.dtype,
        F=sae.W_dec.shape[0],
        D=sae.W_dec.shape[1],
        batch_size=batch,
        mean_l0=sae.W_dec.shape[0] / 100,
    )
    with Store(path) as store:
        store.set_winner_if_faster(key, impl, config, 1.0, 10.0)
    reload()


def assert_close(got, want, acts, W, dtype):
    """Within the dtype's rounding of the summed terms (both sides round once or twice)."""
    scale = acts.double().abs().reshape(-1, W.shape[0]) @ W.double().abs()
    tol = 4 * TOLERANCE[dtype] * scale.reshape(*got.shape[:-1], -1) + 4 * TOLERANCE[dtype]
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.double() - want.double()).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g}"


@pytest.fixture(autouse=True)
def isolated(tmp_path, isolated_dispatch):
    sae_tune.patch()  # as `import sae_tune` does (the fresh interpreters below check that it does)
    yield tmp_path
    sae_tune.patch()
    reload()


# --- fresh interpreters: import order, opt-out, no SAELens ---------------------------------------------

CHECK = """
import sys, torch
{imports}
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from sae_tune.integrations.saelens import is_patched
sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=64, d_sae=4096))
with torch.no_grad():
    sae.W_enc.normal_(0, 64 ** -0.5)
    sae.threshold.fill_(2.33)
    x = torch.randn(4, 64)
    out = sae(x)
    acts = sae.encode(x)
    ref = acts @ sae.W_dec + sae.b_dec
print(is_patched(JumpReLUSAE), sae_tune.explain(acts, sae.W_dec, sae.b_dec).source,
      bool(torch.allclose(out, ref, atol=1e-5)))
"""
SCRIPTS = {
    "lens-first": CHECK.format(imports="import sae_lens\nimport sae_tune"),
    "tune-first": CHECK.format(
        imports="import sae_tune\nassert 'sae_lens' not in sys.modules and 'triton' not in sys.modules\n"
        "import sae_lens"
    ),
    "opt-out": CHECK.format(imports="import sae_tune\nimport sae_lens")
    + "sae_tune.patch()\nprint(is_patched(JumpReLUSAE))\n"
    + "sae_tune.unpatch()\nprint(is_patched(JumpReLUSAE))\n",
    "no-saelens": textwrap.dedent("""
        import sys
        sys.modules["sae_lens"] = None  # as if not installed: importing it raises ImportError
        import sae_tune
        heavy = [m for m in ("sae_lens", "triton", "sqlite_utils", "optuna") if sys.modules.get(m)]
        print(heavy, sae_tune.patch(), sae_tune.integrations.is_active())
        sae_tune.unpatch()
    """),
}
EXPECTED = {
    "lens-first": "True model True\n",
    "tune-first": "True model True\n",
    "opt-out": "False model True\nTrue\nFalse\n",
    "no-saelens": "[] () True\n",
}


@pytest.fixture(scope="module", autouse=True)
def fresh_runs(tmp_path_factory):
    """Start every fresh interpreter when the module starts (importing SAELens takes seconds), so they run
    while the in-process tests do; the tests at the end collect them."""
    env = {**os.environ, "SAE_TUNE_SHIPPED_DIR": str(tmp_path_factory.mktemp("shipped"))}
    env.pop("SAE_TUNE_AUTOPATCH", None)
    procs = {}
    for name, script in SCRIPTS.items():
        run_env = {**env, "SAE_TUNE_AUTOPATCH": "0"} if name == "opt-out" else env
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", script],
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    yield procs
    for proc in procs.values():
        proc.kill()


# --- outputs equal the unpatched ones -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"F{s[0]}-D{s[1]}")
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_decode_equal_unpatched(isolated, caplog, arch, shape, dtype):
    F, D = shape
    sae = shared_sae(arch, F, D, dtype)
    record_winner(isolated / "cache.sqlite", "embedding_bag_csr", {}, sae)
    x = inputs(D, dtype)
    with torch.no_grad():
        acts = sae.encode(x)
        l0 = (acts != 0).sum(-1).float().mean().item()
        assert 0.2 * F / 100 < l0 < 3 * F / 100, l0  # about 1% fire
        with caplog.at_level(logging.DEBUG, logger="sae_tune"):
            out, dec = sae(x), sae.decode(acts)
        with sae_tune.unpatched():
            assert not is_patched(type(sae))
            ref_out, ref_dec = sae(x), sae.decode(acts)
    assert is_patched(type(sae))
    assert any("embedding_bag_csr (cache)" in r.getMessage() for r in caplog.records)
    decision = sae_tune.explain(acts, sae.W_dec, sae.b_dec)
    assert (decision.implementation, decision.source) == ("embedding_bag_csr", "cache")
    assert_close(out, ref_out, acts, sae.W_dec, dtype)
    assert_close(dec, ref_dec, acts, sae.W_dec, dtype)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("arch", ARCHS)
def test_cost_model_path_for_an_untuned_sae(arch, grad_mode):
    sae = shared_sae(arch, 16384, 768, torch.float32, z=2.88)  # 0.2% fire, like Gemma Scope's 0.1%
    x = inputs(768, torch.float32, shape=(2, 8))  # N-D input, 16 tokens
    with grad_mode():
        acts = sae.encode(x)
        decision = sae_tune.explain(acts, sae.W_dec, sae.b_dec)
        out = sae(x)
        with sae_tune.unpatched():
            ref = sae(x)
    gather = "cpu" if by_name("cpu").available(torch.device("cpu")) is None else "embedding_bag_csr"
    assert (decision.implementation, decision.source) == (gather, "model"), decision
    assert_close(out, ref, acts, sae.W_dec, torch.float32)


def test_hooks_normalisation_and_reshaping_run_as_before(isolated):
    cfg = dict(normalize_activations="layer_norm", reshape_activations="hook_z")
    sae = make_sae("jumprelu", 4096, 256, torch.float32, **cfg)
    sae.cfg.metadata.hook_name = "blocks.0.attn.hook_z"
    sae.turn_on_forward_pass_hook_z_reshaping()
    record_winner(isolated / "cache.sqlite", "embedding_bag_csr", {}, sae)
    seen = []

    def double_recons(tensor, hook):
        seen.append(hook.name)
        return tensor * 2

    sae.hook_sae_recons.add_hook(double_recons)
    sae.hook_sae_output.add_hook(lambda tensor, hook: seen.append(hook.name))
    x = inputs(256, torch.float32).reshape(BATCH, 8, 32)  # (tokens, n_heads, d_head)
    with torch.no_grad():
        out = sae(x)
        with sae_tune.unpatched():
            ref = sae(x)
        acts = sae.encode(x)
    assert out.shape == ref.shape == (BATCH, 8, 32)
    assert seen == ["hook_sae_recons", "hook_sae_output"] * 2
    assert sae_tune.explain(acts, sae.W_dec, sae.b_dec).source == "cache"
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_topk_promise_lets_the_fixed_k_path_run_and_steering_voids_it(isolated, caplog):
    sae = make_sae("topk", 4096, 256, torch.float32)
    k = sae.cfg.k
    record_winner(isolated / "cache.sqlite", "embedding_bag_topk", {"k": k}, sae)
    x = inputs(256, torch.float32)
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="sae_tune"):
        out = sae.decode(sae.encode(x))  # (the hook-free forward decodes from sparse activations instead)
        with sae_tune.unpatched():
            ref = sae(x)
        assert_close(out, ref, sae.encode(x), sae.W_dec, torch.float32)
        assert any(
            "embedding_bag_topk" in r.getMessage() and "(cache)" in r.getMessage() for r in caplog.records
        )

        steered_acts = []

        def steer(acts, hook):  # in place: the activation's promise of <= k per token no longer holds
            acts[:, :50] = 1.0
            steered_acts.append(acts.clone())
            return acts

        sae.hook_sae_acts_post.add_hook(steer)
        steered = sae(x)
        with sae_tune.unpatched():
            steered_ref = sae(x)
        assert ((sae.encode(x) != 0).sum(-1) > k).all()
    assert_close(steered, steered_ref, steered_acts[0], sae.W_dec, torch.float32)
    loose = torch.zeros(BATCH, 4096)
    loose[:, : 2 * k] = 1.0  # acts from elsewhere carry no promise
    with torch.no_grad():
        assert_close(sae.decode(loose), loose @ sae.W_dec + sae.b_dec, loose, sae.W_dec, torch.float32)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_through_forward_equal_unpatched(isolated, arch):
    sae = make_sae(arch, 4096, 256, torch.float32)
    record_winner(isolated / "cache.sqlite", "embedding_bag_csr", {}, sae)
    x = inputs(256, torch.float32)

    def grads():
        sae.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        sae(xr).square().sum().backward()
        return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None} | {"x": xr.grad}

    ours = grads()
    with sae_tune.unpatched():
        ref = grads()
    assert ours.keys() == ref.keys() and {"W_dec", "b_dec", "W_enc", "x"} <= ours.keys()
    for name in ref:
        assert torch.allclose(ours[name], ref[name], rtol=1e-4, atol=1e-5), name


def test_patch_unpatch_and_context_manager():
    cls = sae_lens.JumpReLUSAE
    assert is_patched(cls) and is_patched(sae_lens.StandardSAE) and is_patched(sae_lens.TopKSAE)
    assert is_patched(sae_lens.GatedSAE)
    original = cls.__dict__["decode"].__sae_tune_original__
    assert "JumpReLUSAE.decode" in sae_tune.unpatch()
    assert cls.__dict__["decode"] is original and not is_patched(cls)
    with sae_tune.patched():
        assert is_patched(cls)
    assert not is_patched(cls)
    assert sae_tune.patch() and sae_tune.patch() == ()  # idempotent
    assert is_patched(cls)
    with sae_tune.unpatched():
        assert not is_patched(cls)
    assert is_patched(cls)


def test_unusual_inputs_are_left_to_saelens():
    sae = make_sae("jumprelu", 4096, 256, torch.float32)
    acts = torch.zeros(3, 4096)
    acts[:, :5] = 1.0
    with torch.no_grad():
        assert torch.allclose(sae.decode(acts.to_sparse()), acts @ sae.W_dec + sae.b_dec)
        with pytest.raises(RuntimeError):  # torch's own error, as without sae-tune
            sae.decode(acts.double())
        with pytest.raises(RuntimeError):
            sae.decode(acts[:, :100])
        assert sae.decode(torch.zeros(0, 4096)).shape == (0, 256)


# --- fresh interpreters (started with the module, collected last) ---------------------------------------


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_fresh_interpreter(fresh_runs, name):
    out, err = fresh_runs[name].communicate(timeout=120)
    assert fresh_runs[name].returncode == 0, err
    assert out == EXPECTED[name], err
