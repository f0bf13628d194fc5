"""`mint adapter export REF DIR`: a stored revision back as a PEFT directory, through the CLI
(a real `python -m mintmesh.cli` process with MINT_API_KEY) against a real store and router
with auth on. Adapters made by peft are pushed in every storage format and as merges (of
different ranks: the merged modules' ranks differ, so the export needs rank_pattern); each
export is loaded by peft's PeftModel.from_pretrained and must give the original adapter's
logits (to 1e-6 for float32, within the format's quantization error otherwise), hold exactly
the weights the executor computes with (the pack's dequantized tensors, with the pack's scale
per module), and push again to the same digest where the format is lossless. Bad references
are one clean error line naming the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from peft_util import make_peft_adapter, make_strong_adapter
from safetensors.torch import load_file, save_file

from mintmesh import packed, peft_io
from mintmesh.client import MintClient
from mintmesh.model import load_model
from mintmesh.services.router.config import RouterConfig
from mintmesh.services.router.server import create_server as create_router
from mintmesh.services.store.config import StoreConfig
from mintmesh.services.store.server import create_server as create_store

ADMIN_KEY = "mint_admin_" + "e" * 32
TOKEN = "internal-" + "x" * 32
PROMPTS = ["Hello world", "The quick brown fox", "LoRA adapters: 1, 2, 3"]
# Max |logits - logits of the original adapter| / max |logits|, by storage format. The tiny
# backbone measures ~2.6e-3 (bf16), ~2.6e-4 (fp16), ~6e-3 (int8) in the quantize bench.
REL_TOL = {"float32": 0.0, "bfloat16": 1e-2, "float16": 1e-3, "int8": 2e-2}
MERGE_W = {"src/peft@1": 0.75, "src/strong@1": -0.5}


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, tmp_path_factory):
    store = create_store(
        StoreConfig(
            data_dir=tmp_path_factory.mktemp("store"),
            model_dir=tiny_model_dir,
            auth=True,
            admin_key=ADMIN_KEY,
            internal_token=TOKEN,
        )
    )
    router, _ = create_router(
        RouterConfig(
            store_address=store.address,
            executors=("127.0.0.1:1",),
            port=0,
            health_interval_s=5,
            auth=True,
            internal_token=TOKEN,
        )
    )
    with MintClient(router.address, timeout=30, retries=0, api_key=ADMIN_KEY) as admin:
        keys = {t: admin.create_tenant(t).api_key for t in ("src", "other")}
    yield {"address": router.address, "keys": keys}
    router.stop(0)
    store.stop(0)


@pytest.fixture(scope="module")
def pushed(mesh, tiny_model_dir, tmp_path_factory):
    """Two peft adapters (rank 8 on q,v with alpha 12; a strong rank-4 one on all seven
    modules), each pushed in every format, and merges of them: ref -> (source dirs, format)."""
    root = tmp_path_factory.mktemp("peft")
    src = {
        "peft": make_peft_adapter(tiny_model_dir, root / "peft", rank=8, alpha=12.0, seed=5),
        "strong": make_strong_adapter(tiny_model_dir, root / "strong", rank=4, seed=7),
    }
    cases = {}
    with MintClient(mesh["address"], timeout=30, retries=0, api_key=mesh["keys"]["src"]) as cl:
        for kind, d in src.items():
            for fmt in packed.STORAGE_FORMATS:
                rev = cl.push_adapter(d, f"src/{kind}", storage_format=fmt)
                cases[f"{kind}-{fmt}"] = (rev, [(d, 1.0)], fmt)
        for fmt in ("float32", "int8"):
            rev = cl.merge("src/merged", list(MERGE_W.items()), storage_format=fmt)
            parts = [(src[r.split("/")[1].split("@")[0]], w) for r, w in MERGE_W.items()]
            cases[f"merged-{fmt}"] = (rev, parts, fmt)
    with MintClient(mesh["address"], timeout=30, api_key=mesh["keys"]["other"]) as cl:
        cl.push_adapter(src["peft"], "other/own")  # another tenant's, for the denial case
    return src, cases


def mint(mesh, *args: str, key: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINT_")}
    env.update(MINT_API_KEY=key or mesh["keys"]["src"], COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "mintmesh.cli", *args, "--router", mesh["address"]],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _ids(tok) -> list[torch.Tensor]:
    return [torch.tensor([tok(p)["input_ids"]]) for p in PROMPTS]


def _logits(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=x).logits[0].double() for x in ids]


def _peft(model_dir, adapter_dir) -> PeftModel:
    base, _ = load_model(model_dir)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _stored(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """t as the format stores it, back in float32: the README's definition of each format
    (int8: symmetric per row, scale = max |row| / 127), written here independently of packed."""
    t = t.float()
    if fmt in ("bfloat16", "float16"):
        return t.to(getattr(torch, fmt)).float()
    if fmt == "int8":
        s = t.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(t / s[:, None]).clamp(-127, 127)
        return q * s[:, None]
    return t


def _stored_dir(src, fmt: str, out):
    """The original peft directory with each tensor as `fmt` stores it (float32 files)."""
    out.mkdir()
    (out / peft_io.CONFIG_NAME).write_text((src / peft_io.CONFIG_NAME).read_text())
    t = load_file(str(src / peft_io.WEIGHTS_NAME))
    save_file({k: _stored(v, fmt) for k, v in t.items()}, str(out / peft_io.WEIGHTS_NAME))
    return out


def _merged_reference(model_dir, parts, fmt: str) -> torch.nn.Module:
    """What a merged revision means, from the sources' own peft files: per module A = cat(A_i),
    B = cat(w_i * scale_i * B_i), each stored as `fmt`, and B @ A added to the Linear's weight
    (in float64, like the model)."""
    model = load_model(model_dir)[0].double()
    mods = dict(model.named_modules())
    cat: dict[str, tuple[list, list]] = {}
    for d, w in parts:
        cfg = json.loads((d / peft_io.CONFIG_NAME).read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        t = load_file(str(d / peft_io.WEIGHTS_NAME))
        for key, a in sorted(t.items()):
            if ".lora_A." in key:
                name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                b = t[key.replace(".lora_A.", ".lora_B.")]
                cat.setdefault(name, ([], []))
                cat[name][0].append(a.float())
                cat[name][1].append(b.float() * float(w * scale))
    with torch.no_grad():
        for name, (a_parts, b_parts) in cat.items():
            a = _stored(torch.cat(a_parts, dim=0), fmt).double()
            b = _stored(torch.cat(b_parts, dim=1), fmt).double()
            mods[name].weight += b @ a
    return model


def _rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True))


def _abs(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))


CASES = [f"{k}-{f}" for k in ("peft", "strong") for f in packed.STORAGE_FORMATS] + [
    "merged-float32",
    "merged-int8",
]


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_peft_and_computes_what_the_revision_serves(
    mesh, pushed, tiny_model_dir, tmp_path, case
):
    _, cases = pushed
    rev, parts, fmt = cases[case]
    out = tmp_path / "exported"
    r = mint(mesh, "adapter", "export", rev.ref, str(out), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    want_dtype = "float32" if fmt == "int8" else fmt
    assert info["ref"] == rev.ref and info["digest"] == rev.digest
    assert info["storage_format"] == fmt and info["dtype"] == want_dtype

    # Exactly the weights the executor computes with: the pack's tensors, dequantized for int8
    # (packed.unpack is what the executor's loader calls), and the pack's scale per module.
    with MintClient(mesh["address"], timeout=30, api_key=mesh["keys"]["src"]) as cl:
        data = cl.fetch(ref=rev.ref)
    _, modules = packed.unpack(data, copy=True)
    tensors = load_file(str(out / peft_io.WEIGHTS_NAME))
    assert len(tensors) == 2 * len(modules)
    for name, mw in modules.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert str(a.dtype) == f"torch.{want_dtype}" and str(b.dtype) == f"torch.{want_dtype}"
        assert torch.equal(a, mw.A) and torch.equal(b, mw.B), name

    pm = _peft(tiny_model_dir, out)
    lora_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in pm.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    assert set(lora_layers) >= set(modules)
    for name, mw in modules.items():
        layer = lora_layers[name]
        assert layer.r["default"] == mw.rank and layer.scaling["default"] == mw.scale, name
        assert torch.equal(layer.lora_A["default"].weight, mw.A.float()), name
        assert torch.equal(layer.lora_B["default"].weight, mw.B.float()), name
    for name in set(lora_layers) - set(modules):  # wrapped by target_modules, not in the pack
        assert not lora_layers[name].lora_B["default"].weight.any(), name

    ids = _ids(load_model(tiny_model_dir)[1])
    got = _logits(pm, ids)
    base = _logits(load_model(tiny_model_dir)[0], ids)
    assert _rel(got, base) > 1e-3, "the adapter changes the model: the checks below are not void"
    if case.startswith("merged"):
        # The sum of the sources' deltas added to the weights: the same sums in another order,
        # so both in float64 (in float32 the strong source amplifies the rounding to ~1e-5).
        want = _logits(_merged_reference(tiny_model_dir, parts, fmt), ids)
        err = _rel(_logits(pm.double(), ids), want)
        assert err <= 1e-9, (case, err)
        return
    src = parts[0][0]
    # peft with the original adapter's weights as the format stores them: the same logits
    # (float32: the original adapter itself), and the same tensors as the export's.
    stored = _stored_dir(src, fmt, tmp_path / "stored")
    want_stored = load_file(str(stored / peft_io.WEIGHTS_NAME))
    for key, t in tensors.items():
        assert torch.equal(t.float(), want_stored[key]), key
    assert _abs(got, _logits(_peft(tiny_model_dir, stored), ids)) <= 1e-6
    original = _logits(_peft(tiny_model_dir, src), ids)
    err = _rel(got, original)
    if fmt == "float32":
        assert _abs(got, original) <= 1e-6
    else:
        # Off the original by the format's quantization error and nothing else (the check
        # above); the mild adapter is held to a bound per format, the strong one (issue 11's
        # regime: all seven modules, 4x weights) amplifies any rounding too much for one.
        assert err > 0, "a lossy format changes something"
        if case.startswith("peft"):
            assert err <= REL_TOL[fmt], (case, err)


@pytest.mark.parametrize("case", ["peft-float32", "strong-bfloat16", "merged-float32"])
def test_pushing_an_export_again_gives_the_same_digest(mesh, pushed, tmp_path, case):
    """Lossless formats round-trip byte for byte (a merge too: its rank_pattern and
    alpha_pattern give back each module's rank and scale)."""
    _, cases = pushed
    rev, _, _ = cases[case]
    out = tmp_path / "exported"
    assert mint(mesh, "adapter", "export", rev.ref, str(out)).returncode == 0
    r = mint(mesh, "adapter", "push", str(out), "--name", "src/again", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    again = json.loads(r.stdout)
    assert again["digest"] == rev.digest and again["ref"] != rev.ref


def test_export_prints_what_it_wrote_and_refuses_to_overwrite(mesh, pushed, tmp_path):
    _, cases = pushed
    rev, _, _ = cases["peft-int8"]
    out = tmp_path / "deep" / "dir"
    r = mint(mesh, "adapter", "export", "src/peft@latest", str(out))
    assert r.returncode == 0, r.stderr
    latest = cases["peft-int8"][0]  # the last push of src/peft
    assert latest.ref in r.stdout and "int8 -> float32" in r.stdout, r.stdout
    assert sorted(p.name for p in out.iterdir()) == [peft_io.CONFIG_NAME, peft_io.WEIGHTS_NAME]
    again = mint(mesh, "adapter", "export", rev.ref, str(out))
    assert again.returncode == 1 and "--force" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr
    assert mint(mesh, "adapter", "export", rev.ref, str(out), "--force").returncode == 0


@pytest.mark.parametrize(
    "ref, code, needle",
    [
        ("src/ghost", 1, "NOT_FOUND"),
        ("src/peft@99", 1, "NOT_FOUND"),
        ("src/peft@nope", 1, "NOT_FOUND"),
        ("other/own", 1, "PERMISSION_DENIED"),
        ("not a ref", 2, "malformed"),
    ],
    ids=["unknown-adapter", "unknown-revision", "unknown-alias", "other-tenant", "malformed"],
)
def test_bad_refs_are_one_clean_error_naming_the_ref(mesh, pushed, tmp_path, ref, code, needle):
    out = tmp_path / "never"
    r = mint(mesh, "adapter", "export", ref, str(out))
    assert r.returncode == code, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert f"'{ref}'" in r.stderr or f"export {ref}:" in r.stderr, r.stderr
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not out.exists(), "nothing written"


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
             rank_pattern={"model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}),
        dict(r=6, lora_alpha=5, use_rslora=True, target_modules=r".*\.(k_proj|down_proj)",
             rank_pattern={"down_proj": 3}),
    ],
    ids=["rank-and-alpha-patterns", "rslora-regex-targets"],
)  # fmt: skip
def test_packed_to_peft_keeps_each_modules_rank_and_scale(
    tiny_model_dir, base_info, tmp_path, config
):
    """Uploads whose modules differ in rank and alpha (peft's rank_pattern / alpha_pattern,
    rslora, a regex target_modules) export to files peft loads with the same outputs, and that
    pack again to the same digest."""
    from peft import LoraConfig, get_peft_model

    base, tok = load_model(tiny_model_dir)
    pm = get_peft_model(base, LoraConfig(lora_dropout=0.0, **config))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path / "orig")
    want = _logits(pm.eval(), _ids(tok))
    up = peft_io.validate_and_pack(
        *peft_io.read_peft_dir(tmp_path / "orig"), base_info, max_rank=16
    )
    assert len({m.rank for m in packed.read_header(up.data).modules}) == 2, "ranks differ"
    cfg_json, weights = peft_io.packed_to_peft(up.data)
    out = tmp_path / "exported"
    out.mkdir()
    (out / peft_io.CONFIG_NAME).write_text(cfg_json)
    (out / peft_io.WEIGHTS_NAME).write_bytes(weights)
    assert _abs(_logits(_peft(tiny_model_dir, out), _ids(tok)), want) <= 1e-6
    again = peft_io.validate_and_pack(cfg_json, weights, base_info, max_rank=16)
    assert again.digest == up.digest
