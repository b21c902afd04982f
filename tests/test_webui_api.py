"""lora_ext's REST routes (lora_ext.webui.api) without the WebUI: a real LoraIndex over LoRA files written here, a real
LoraSession, A1111's module tree (ldm UNetModel + transformers CLIP, wrapped as the WebUI wraps it) and stubs of
the two `modules.*` the routes read (extra_networks registry, sd_models.model_data).

References are independent of the code under test: file sizes and mtimes from os.stat, A1111's alias and short-hash
rules (ss_output_name, sshs_model_hash[:12]) and sd-version rule written out here, coverage counted from the module
names we wrote and the model's own layers, backup size from the touched weights' numel.

The HTTP tests need fastapi, starlette and httpx (the `ui` extra): dev.sh installs the newest ones in .venv and A1111
v1.10's (FastAPI 0.94, pydantic 1) in .venv-webui, so both run them. Where fastapi is missing,
`test_routes_in_the_webui_python` runs this file under $SD_WEBUI_PYTHON (set by `source $HARNESS_DIR/harness.env`)
and fails if any test fails there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lora_ext.formats.safetensors_io import save_safetensors_atomic
from lora_ext.webui import api
from lora_ext.webui.state import GlueState

HAVE_FASTAPI = importlib.util.find_spec("fastapi") is not None and importlib.util.find_spec("httpx") is not None
needs_fastapi = pytest.mark.skipif(not HAVE_FASTAPI, reason="fastapi/httpx not installed here (see "
                                   "test_routes_in_the_webui_python)")

# tiny A1111 SD1 model: ldm UNet (context 32) + CLIP text encoder (width 32)
LDM_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=2, use_spatial_transformer=True,
                transformer_depth=1, context_dim=32, legacy=False)
CLIP_L = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=8, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=2,
              pad_token_id=1)
# kohya names and the layers they mean (A1111: down_blocks_d_attentions_j -> input_blocks_{1+3d+j}_1)
Q_KOHYA, Q_LDM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q", \
    "input_blocks.1.1.transformer_blocks.0.attn2.to_q"
FC1_KOHYA, FC1_HF = "lora_te_text_model_encoder_layers_0_mlp_fc1", "text_model.encoder.layers.0.mlp.fc1"
BOGUS = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_nothing"
SSHS = "0123456789abcdef" * 4
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))  # served as-is: the content does not matter


# ------------------------------------------------------------------------------------------------------ fixtures


def _ldm_unet_cls():
    try:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
    except ImportError:
        repo = Path(os.environ.get("SD_WEBUI_DIR", "/nonexistent")) / "repositories" / "stable-diffusion-stability-ai"
        if not repo.is_dir():
            pytest.skip("no ldm package (stable-diffusion-sdkit, or the WebUI's repositories)")
        sys.path.insert(0, str(repo))
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
    return UNetModel


@pytest.fixture(scope="module")
def model():
    """An object shaped like A1111's SD1 `shared.sd_model` (what `adapter_for_ldm` reads), random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = _ldm_unet_cls()(**LDM_UNET)
    te = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    with torch.no_grad():
        for p in [*unet.parameters(), *te.parameters()]:
            p.copy_(torch.randn_like(p) * 0.1)
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=unet),
                           cond_stage_model=SimpleNamespace(wrapped=SimpleNamespace(transformer=te)),
                           is_sd1=True, is_sd2=False, is_sdxl=False)


def _layer(model, path: str) -> nn.Module:
    if not path.startswith("text_model"):
        return model.model.diffusion_model.get_submodule(path)
    te = model.cond_stage_model.wrapped.transformer  # transformers >= 5 drops the `text_model.` level
    return next(m for name, m in te.named_modules() if name in (path, path.removeprefix("text_model.")))


def _lora_tensors(model, modules: dict[str, str], seed: int, rank: int = 2, extra: tuple[str, ...] = ()) -> dict:
    """kohya LoRA tensors for `modules` (file name -> model layer path); `extra` modules get a made-up shape."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for key, path in modules.items():
        out_f, in_f = _layer(model, path).weight.shape
        t[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
        t[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
        t[f"{key}.alpha"] = torch.tensor(float(rank))
    for key in extra:
        t[f"{key}.lora_down.weight"] = torch.randn(rank, 32, generator=g)
        t[f"{key}.lora_up.weight"] = torch.randn(32, rank, generator=g)
    return t


class FakeNetwork:
    """Stands in for the glue's ExtraNetwork in the registry."""


@pytest.fixture
def lora_dir(tmp_path, model) -> Path:
    d = tmp_path / "Lora"
    (d / "sub").mkdir(parents=True)
    both = {Q_KOHYA: Q_LDM, FC1_KOHYA: FC1_HF}
    save_safetensors_atomic(_lora_tensors(model, both, 1), d / "alpha.safetensors",
                            metadata={"ss_output_name": "Alpha Style", "ss_network_module": "networks.lora",
                                      "ss_network_dim": "2", "ss_network_alpha": "2"})
    (d / "alpha.json").write_text(json.dumps({"activation text": "alpha trigger", "preferred weight": 0.7}))
    save_safetensors_atomic(_lora_tensors(model, {Q_KOHYA: Q_LDM}, 2), d / "sub" / "beta.safetensors",
                            metadata={"ss_base_model_version": "sdxl_base_v1-0", "sshs_model_hash": SSHS})
    (d / "sub" / "beta.png").write_bytes(PNG)
    save_safetensors_atomic(_lora_tensors(model, both, 3, extra=(BOGUS,)), d / "gamma.safetensors")
    return d


@pytest.fixture
def webui(monkeypatch):
    """Stubs of `modules.extra_networks` and `modules.sd_models` in sys.modules (restored afterwards)."""
    pkg = types.ModuleType("modules")
    pkg.__path__ = []
    en = types.ModuleType("modules.extra_networks")
    en.extra_network_registry = {}
    sm = types.ModuleType("modules.sd_models")
    sm.model_data = SimpleNamespace(sd_model=None)
    pkg.extra_networks, pkg.sd_models = en, sm
    for name, mod in (("modules", pkg), ("modules.extra_networks", en), ("modules.sd_models", sm)):
        monkeypatch.setitem(sys.modules, name, mod)
    return SimpleNamespace(registry=en.extra_network_registry, model_data=sm.model_data)


@pytest.fixture
def st(lora_dir, webui, tmp_path):
    state = GlueState.create([lora_dir], tmp_path / "cache" / "index.json")
    state.index.refresh()
    state.network = FakeNetwork()
    webui.registry["lora"] = state.network
    return state


def _by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def _weights(model) -> dict[str, torch.Tensor]:
    sd = {f"unet.{k}": v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    sd.update({f"te.{k}": v.clone() for k, v in model.cond_stage_model.wrapped.transformer.state_dict().items()})
    return sd


# ------------------------------------------------------------------------------------------ query functions


def test_list_has_every_file_with_fields_from_the_disk(st, lora_dir):
    rows = _by_name(api.list_loras(st))
    assert set(rows) == {"alpha", "beta", "gamma"}
    for name, rel in (("alpha", "alpha.safetensors"), ("beta", "sub/beta.safetensors"),
                      ("gamma", "gamma.safetensors")):
        stat = os.stat(lora_dir / rel)
        row = rows[name]
        assert Path(row["path"]).resolve() == (lora_dir / rel).resolve()
        assert Path(row["relpath"]).as_posix() == rel
        assert row["size"] == stat.st_size
        assert row["mtime"] == pytest.approx(stat.st_mtime_ns / 1e9)
        assert isinstance(row["problems"], list)
    # A1111 rules: alias = ss_output_name else the name; shorthash = sshs_model_hash[:12]; sd version from metadata
    assert [rows[n]["alias"] for n in ("alpha", "beta", "gamma")] == ["Alpha Style", "beta", "gamma"]
    assert rows["beta"]["shorthash"] == SSHS[:12]
    assert [rows[n]["sd_version"] for n in ("alpha", "beta", "gamma")] == ["SD1", "SDXL", "Unknown"]
    assert rows["alpha"]["metadata_summary"]["output_name"] == "Alpha Style"
    assert rows["alpha"]["metadata_summary"]["network_dim"] == 2
    assert rows["alpha"]["user_metadata"] == {"activation text": "alpha trigger", "preferred weight": 0.7}
    assert rows["beta"]["preview"] == "/lora_ext/preview/beta"
    assert rows["alpha"]["preview"] is None and rows["gamma"]["preview"] is None
    json.dumps(list(rows.values()))  # JSON-ready


def test_search_and_version_filters(st):
    def names(**kw) -> set[str]:
        return {r["name"] for r in api.list_loras(st, **kw)}

    assert names(search="ALPHA style") == {"alpha"}  # alias, any case
    assert names(search="sub/") == {"beta"}  # relative path
    assert names(search=SSHS[:8].upper()) == {"beta"}  # short hash
    assert names(search="amm") == {"gamma"}  # name
    assert names(search="no such thing") == set()
    assert names(sd_version="sdxl") == {"beta"}
    assert names(sd_version="SD1") == {"alpha"}
    assert names(sd_version="unknown") == {"gamma"}
    assert names(sd_version="SD1", search="beta") == set()


def test_refresh_picks_up_new_files(st, lora_dir, model):
    save_safetensors_atomic(_lora_tensors(model, {Q_KOHYA: Q_LDM}, 9), lora_dir / "delta.safetensors")
    assert "delta" not in _by_name(api.list_loras(st))
    assert "delta" in _by_name(api.list_loras(st, refresh=True))


def test_status_reports_owner_active_loras_and_backup_size(st, webui, model):
    s = api.status(st)
    assert s["owner"] == FakeNetwork.__module__ and s["handles_tags"] is True
    assert s["loras"] == 3 and s["active"] == [] and s["backup_mib"] == 0
    from lora_ext import __version__

    assert s["version"] == __version__
    act = st.session.activate(model, ["<lora:alpha:0.5>"])
    assert act.applied == ["alpha"], act.problems
    s = api.status(st)
    assert s["active"] == ["alpha"]
    touched = _layer(model, Q_LDM).weight.numel() + _layer(model, FC1_HF).weight.numel()
    assert s["backup_mib"] == pytest.approx(touched * 4 / 2**20, abs=1e-3)
    st.session.restore()
    assert api.status(st)["active"] == []
    webui.registry["lora"] = object()
    s = api.status(st)
    assert s["handles_tags"] is False and s["owner"] == "builtins"
    webui.registry.clear()
    assert api.status(st)["owner"] is None


def test_detail_coverage_against_the_loaded_model_touches_no_weight(st, webui, model):
    webui.model_data.sd_model = model
    before = _weights(model)
    d = api.lora_detail(st, "gamma")
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    assert d["name"] == "gamma" and d["metadata"] == {}
    assert d["file"]["modules"] == 3
    cov = d["coverage"]
    assert d["coverage_reason"] is None
    assert cov["model_arch"] == "sd1" and cov["error"] is None
    assert cov["modules_total"] == 3 and cov["modules_applied"] == 2
    assert len(cov["unmatched"]) == 1 and "to_nothing" in cov["unmatched"][0]
    # the alias finds the file too, with its full metadata
    d = api.lora_detail(st, "Alpha Style")
    assert d["name"] == "alpha" and d["metadata"]["ss_network_module"] == "networks.lora"
    assert d["coverage"]["modules_applied"] == 2 and d["coverage"]["unmatched"] == []
    json.dumps(d)


def test_detail_without_a_model_and_for_another_family(st, webui, model, lora_dir):
    d = api.lora_detail(st, "alpha")
    assert d["coverage"] is None and "no model" in d["coverage_reason"]
    # second text encoder keys: an SDXL file, refused on this SD1 model with a reason, not an exception
    g = torch.Generator().manual_seed(5)
    t = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 32, generator=g),
         "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(64, 2, generator=g)}
    save_safetensors_atomic(t, lora_dir / "xl.safetensors")
    st.index.refresh()
    webui.model_data.sd_model = model
    d = api.lora_detail(st, "xl")
    assert d["file"]["lora_arch"] == "sdxl"
    assert d["coverage"]["modules_applied"] == 0 and "SDXL" in d["coverage"]["error"]


def test_detail_errors(st, lora_dir):
    from lora_ext.errors import LoraExtError, LoraNotFoundError

    with pytest.raises(LoraNotFoundError, match="nope"):
        api.lora_detail(st, "nope")
    (lora_dir / "gamma.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LoraExtError, match="gamma") as err:
        api.lora_detail(st, "gamma")
    assert not isinstance(err.value, LoraNotFoundError)
    (lora_dir / "gamma.safetensors").unlink()
    with pytest.raises(LoraNotFoundError, match="gamma"):
        api.lora_detail(st, "gamma")


def test_preview_only_for_listed_entries(st, lora_dir, tmp_path):
    assert api.preview_path(st, "beta") == lora_dir / "sub" / "beta.png"
    assert api.preview_path(st, "alpha") is None
    (tmp_path / "secret.png").write_bytes(PNG)
    for name in ("../secret", "../secret.png", str(tmp_path / "secret.png"), "sub/beta.png", "nope"):
        assert api.preview_path(st, name) is None


def test_files_sharing_a_name_each_get_a_key_that_reaches_them(st, lora_dir, model):
    save_safetensors_atomic(_lora_tensors(model, {Q_KOHYA: Q_LDM}, 11), lora_dir / "sub" / "alpha.safetensors")
    (lora_dir / "sub" / "alpha.png").write_bytes(PNG + b"sub")
    (lora_dir / "alpha.png").write_bytes(PNG + b"top")
    rows = [r for r in api.list_loras(st, refresh=True) if r["name"] == "alpha"]
    assert sorted(Path(r["relpath"]).as_posix() for r in rows) == ["alpha.safetensors", "sub/alpha.safetensors"]
    assert len({r["key"] for r in rows}) == 2
    for row in rows:
        d = api.lora_detail(st, row["key"])
        assert Path(d["path"]).resolve() == Path(row["path"]).resolve()
        tail = b"sub" if row["relpath"].startswith("sub") else b"top"
        assert api.preview_path(st, row["key"]).read_bytes() == PNG + tail
        assert row["preview"] == "/lora_ext/preview/" + urllib.parse.quote(row["key"])


def test_builtin_format_list(st, lora_dir):
    rows = api.builtin_list(st)
    assert all(set(r) == {"name", "alias", "path", "metadata"} for r in rows)
    rows = _by_name(rows)
    assert set(rows) == {"alpha", "beta", "gamma"}
    assert rows["alpha"]["alias"] == "Alpha Style" and rows["alpha"]["metadata"]["ss_network_dim"] == "2"
    assert Path(rows["beta"]["path"]).resolve() == (lora_dir / "sub" / "beta.safetensors").resolve()


# --------------------------------------------------------------------------------------------------- HTTP routes


@pytest.fixture
def client(st):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    api.add_routes(app, st)
    return TestClient(app)


@needs_fastapi
def test_http_status_list_and_refresh(client, lora_dir, model):
    r = client.get("/lora_ext/status")
    assert r.status_code == 200 and r.json()["loras"] == 3 and r.json()["handles_tags"] is True
    r = client.get("/lora_ext/loras", params={"search": "alpha STYLE"})
    assert r.status_code == 200 and [x["name"] for x in r.json()] == ["alpha"]
    assert {x["name"] for x in client.get("/lora_ext/loras", params={"sd_version": "SDXL"}).json()} == {"beta"}
    save_safetensors_atomic(_lora_tensors(model, {Q_KOHYA: Q_LDM}, 9), lora_dir / "delta.safetensors")
    assert len(client.get("/lora_ext/loras").json()) == 3
    assert len(client.get("/lora_ext/loras", params={"refresh": "true"}).json()) == 4
    (lora_dir / "delta.safetensors").unlink()
    r = client.post("/lora_ext/refresh")
    assert r.status_code == 200 and r.json() == {"count": 3}


@needs_fastapi
def test_http_detail(client, webui, model, lora_dir):
    webui.model_data.sd_model = model
    r = client.get("/lora_ext/loras/gamma")
    assert r.status_code == 200
    assert r.json()["coverage"]["modules_applied"] == 2 and r.json()["coverage"]["modules_total"] == 3
    r = client.get("/lora_ext/loras/Alpha Style")
    assert r.status_code == 200 and r.json()["name"] == "alpha"
    r = client.get("/lora_ext/loras/no_such_lora")
    assert r.status_code == 404 and r.json()["detail"]["name"] == "no_such_lora"
    assert "no_such_lora" in r.json()["detail"]["error"]
    (lora_dir / "gamma.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = client.get("/lora_ext/loras/gamma")
    assert r.status_code == 422 and "gamma.safetensors" in r.json()["detail"]["error"]


@needs_fastapi
def test_http_preview(client, tmp_path):
    r = client.get("/lora_ext/preview/beta")
    assert r.status_code == 200 and r.content == PNG and r.headers["content-type"] == "image/png"
    url = client.get("/lora_ext/loras", params={"search": "beta"}).json()[0]["preview"]
    assert client.get(url).content == PNG
    (tmp_path / "secret.png").write_bytes(PNG)
    for name in ("alpha", "../secret.png", "..%2Fsecret.png", "sub/beta.png", "nope"):
        assert client.get(f"/lora_ext/preview/{name}").status_code == 404, name


@needs_fastapi
def test_http_builtin_routes_only_when_absent(st, lora_dir, model):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    api.add_routes(app, st)
    client = TestClient(app)
    rows = client.get("/sdapi/v1/loras").json()
    assert {r["name"] for r in rows} == {"alpha", "beta", "gamma"}
    assert all(set(r) == {"name", "alias", "path", "metadata"} for r in rows)
    save_safetensors_atomic(_lora_tensors(model, {Q_KOHYA: Q_LDM}, 9), lora_dir / "delta.safetensors")
    r = client.post("/sdapi/v1/refresh-loras")
    assert r.status_code == 200 and r.json() is None
    assert "delta" in {r["name"] for r in client.get("/sdapi/v1/loras").json()}

    other = FastAPI()
    other.add_api_route("/sdapi/v1/loras", lambda: ["builtin"], methods=["GET"])
    api.add_routes(other, st)
    client = TestClient(other)
    assert client.get("/sdapi/v1/loras").json() == ["builtin"]
    assert client.post("/sdapi/v1/refresh-loras").status_code in (404, 405)
    assert [r.path for r in other.routes].count("/sdapi/v1/loras") == 1


# ------------------------------------------------------------------------------------ the HTTP tests elsewhere


@pytest.mark.skipif(HAVE_FASTAPI, reason="fastapi is installed here: the HTTP tests above ran")
def test_routes_in_the_webui_python():
    python = os.environ.get("SD_WEBUI_PYTHON")
    if not python:
        pytest.skip("fastapi missing here and SD_WEBUI_PYTHON not set (source $HARNESS_DIR/harness.env)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    this = Path(__file__).resolve()
    proc = subprocess.run([python, "-m", "pytest", "--noconftest", "-p", "no:cacheprovider", "-q", str(this),
                           "-k", "not test_routes_in_the_webui_python"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    last = proc.stdout.strip().splitlines()[-1]
    assert re.match(r"^\d+ passed, 1 deselected\b", last) and "skipped" not in last, tail  # nothing skipped
