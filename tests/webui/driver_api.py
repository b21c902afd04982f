"""Runs the REST-route and cards-page scenarios inside a real AUTOMATIC1111 WebUI process (run with $SD_WEBUI_PYTHON,
not pytest) and writes what it saw to OUT_DIR/result.json; tests/webui/test_api_cards.py asserts on it.

usage: driver_api.py SCENARIO OUT_DIR [--arch sd1|sdxl] [-- extra WebUI args]

Scenarios:
  routes      the built-in Lora extension loaded (default): our /lora_ext/* routes through fastapi's TestClient on the
              app the WebUI passed to app_started, with the built-in's own reading of the same files as reference
  no_builtin  the built-in disabled through the data dir's config.json ("disabled_extensions": ["Lora"], as the
              Extensions tab writes it): our cards page and our /sdapi/v1/loras, refresh-loras
Booting, the WebUI arguments and the LoRA files come from driver.py (`boot`, `make_loras`, `set_owner`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import driver  # noqa: E402  (tests/webui/driver.py)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))  # served as-is: the content does not matter


def _lora_dir() -> Path:
    return Path(sys.argv[sys.argv.index("--lora-dir") + 1])


def _refresh() -> None:
    from lora_ext.webui import glue

    glue.state().index.refresh()


def _call(client, method: str, url: str, **kw) -> dict:
    r = client.request(method, url, **kw)
    try:
        body = r.json()
    except ValueError:
        body = None
    return {"status": r.status_code, "json": body, "bytes": len(r.content),
            "content_type": r.headers.get("content-type")}


def _routes(app) -> list[list[str]]:
    """[path, endpoint module] of every route of the app."""
    return [[r.path, getattr(getattr(r, "endpoint", None), "__module__", "")] for r in app.routes]


def _pages() -> list[list[str]]:
    from modules import ui_extra_networks

    return [[p.title, type(p).__module__] for p in ui_extra_networks.extra_pages]


def _bad_files(arch: str) -> None:
    """broken.safetensors (not a safetensors file) and other_family.safetensors (second-text-encoder keys: SDXL)."""
    import torch

    from lora_ext.formats.safetensors_io import save_safetensors_atomic

    d = _lora_dir()
    (d / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    if arch == "sd1":
        g = torch.Generator().manual_seed(7)
        t = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 1280, generator=g),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(5120, 4, generator=g)}
        save_safetensors_atomic(t, d / "other_family.safetensors", metadata={})


# ------------------------------------------------------------------------------------------------------ scenarios


def scenario_routes(args) -> dict:
    """Built-in loaded: /lora_ext/* against the built-in's own view of the same files."""
    import networks  # the built-in's module (extensions-builtin/Lora)
    from fastapi.testclient import TestClient
    from modules import script_callbacks, shared

    made = driver.make_loras(args.arch)
    lora_dir = _lora_dir()
    first = next(iter(made))
    (lora_dir / f"{first}.png").write_bytes(PNG)
    _bad_files(args.arch)
    _refresh()
    networks.list_available_networks()
    client = TestClient(driver.APP)
    out: dict = {"files": made, "first": first, "routes": _routes(driver.APP), "pages": _pages()}
    out["status"] = _call(client, "GET", "/lora_ext/status")
    out["list"] = _call(client, "GET", "/lora_ext/loras")
    out["search"] = _call(client, "GET", "/lora_ext/loras", params={"search": first.upper()})
    out["filter_sdxl"] = _call(client, "GET", "/lora_ext/loras", params={"sd_version": "SDXL"})

    # the built-in's reading of each file: alias, version, and the modules it matches on this model
    builtin = {}
    for name, on_disk in networks.available_networks.items():
        row = {"alias": on_disk.alias, "sd_version": on_disk.sd_version.name, "filename": on_disk.filename,
               "metadata": on_disk.metadata}
        try:
            net = networks.load_network(name, on_disk)
            row["matched_modules"] = len(net.modules)
        except Exception as err:  # the built-in raises on files it cannot use
            row["error"] = repr(err)
        builtin[name] = row
    out["builtin"] = builtin
    out["details"] = {name: _call(client, "GET", f"/lora_ext/loras/{name}") for name in builtin}
    out["unknown"] = _call(client, "GET", "/lora_ext/loras/does_not_exist")

    out["preview"] = _call(client, "GET", f"/lora_ext/preview/{first}")
    out["preview_same_bytes"] = client.get(f"/lora_ext/preview/{first}").content == PNG
    (lora_dir.parent / "outside.png").write_bytes(PNG)
    out["preview_refused"] = {name: client.get(f"/lora_ext/preview/{name}").status_code
                              for name in ("../outside", "../outside.png", "..%2Foutside.png", str(lora_dir.parent /
                                           "outside.png"), f"{first}.png", "broken")}

    # a new file: not listed until a refresh
    shutil.copy(lora_dir / f"{first}.safetensors", lora_dir / "added_later.safetensors")
    out["count_before_refresh"] = len(client.get("/lora_ext/loras").json())
    out["refresh"] = _call(client, "POST", "/lora_ext/refresh")
    out["sdapi_loras"] = _call(client, "GET", "/sdapi/v1/loras")

    # what /status says while a LoRA is merged (during sampling) and after the generation
    driver.set_owner(True)
    during = []

    def probe(params):
        if params.sampling_step == 0:
            during.append(client.get("/lora_ext/status").json())

    script_callbacks.on_cfg_denoiser(probe)
    driver.generate(f"a cat <lora:{first}:0.8>")
    script_callbacks.remove_callbacks_for_function(probe)
    out["status_during"] = during
    out["status_after"] = client.get("/lora_ext/status").json()
    driver.set_owner(False)
    out["status_handed_back"] = client.get("/lora_ext/status").json()
    driver.set_owner(True)
    out["model_is_sdxl"] = bool(getattr(shared.sd_model, "is_sdxl", False))
    return out


def _eval_card_prompt(expr: str, default_multiplier: float) -> str:
    """The text a card inserts: its `prompt` is a JS expression of quoted strings, numbers and
    `opts.extra_networks_default_multiplier` joined by " + " (A1111's cardClicked evaluates it)."""
    parts = []
    for token in expr.split(" + "):
        if token == "opts.extra_networks_default_multiplier":
            parts.append(str(default_multiplier))
        elif token.startswith('"'):
            parts.append(json.loads(token))
        else:
            parts.append(token)
    return "".join(parts)


def _card_rows(page) -> dict:
    from modules import shared

    mult = shared.opts.extra_networks_default_multiplier
    rows = {}
    for item in page.list_items():
        rows[item["name"]] = {"prompt": item["prompt"], "text": _eval_card_prompt(item["prompt"], mult),
                              "negative_prompt": item["negative_prompt"], "preview": item["preview"],
                              "search_terms": item["search_terms"], "sd_version": item["sd_version"],
                              "filename": item["filename"], "description": item.get("description")}
    return rows


def scenario_no_builtin(args) -> dict:
    """Built-in disabled: our cards page and /sdapi/v1/loras."""
    import numpy as np
    import torch
    from fastapi.testclient import TestClient
    from modules import extensions, shared, ui_extra_networks

    from lora_ext.formats.safetensors_io import load_tensors, save_safetensors_atomic

    out: dict = {"builtin_modules_loaded": sorted(m for m in ("networks", "extra_networks_lora",
                                                              "ui_extra_networks_lora") if m in sys.modules),
                 "builtin_enabled": [e.enabled for e in extensions.extensions if e.is_builtin and e.name == "Lora"],
                 "routes": _routes(driver.APP), "pages": _pages()}
    made = driver.make_loras(args.arch)
    names = list(made)
    lora_dir = _lora_dir()
    tensors = load_tensors(lora_dir / f"{names[0]}.safetensors")
    save_safetensors_atomic(tensors, lora_dir / "aliased.safetensors", metadata={"ss_output_name": "My Alias"})
    (lora_dir / f"{names[0]}.png").write_bytes(PNG)
    (lora_dir / f"{names[0]}.txt").write_text("a description")
    (lora_dir / f"{names[1]}.json").write_text(json.dumps({"preferred weight": 0.6, "activation text": "trig word",
                                                           "negative text": "ugly"}))
    # a file of the other family (second text encoder) and one of unknown version (no metadata, no telling keys)
    g = torch.Generator().manual_seed(3)
    if args.arch == "sd1":
        xl = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 1280, generator=g),
              "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(5120, 4, generator=g)}
        save_safetensors_atomic(xl, lora_dir / "other_family.safetensors", metadata={})
    unknown = {"lora_unet_made_up_layer.lora_down.weight": torch.randn(4, 8, generator=g),
               "lora_unet_made_up_layer.lora_up.weight": torch.randn(8, 4, generator=g)}
    save_safetensors_atomic(unknown, lora_dir / "unknown_version.safetensors")
    # a second file with the name of names[2], in a subfolder: listed later, so the name reaches it
    (lora_dir / "sub").mkdir()
    shutil.copy(lora_dir / f"{names[2]}.safetensors", lora_dir / "sub" / f"{names[2]}.safetensors")
    _refresh()

    page = next((p for p in ui_extra_networks.extra_pages if p.title == "Lora"), None)
    out["page_class"] = type(page).__module__ if page is not None else None
    out["allowed_dirs"] = sorted(ui_extra_networks.allowed_dirs)
    out["lora_dir"] = str(lora_dir)
    out["default_multiplier"] = shared.opts.extra_networks_default_multiplier
    out["cards"] = _card_rows(page)
    shared.opts.set("lora_show_all", True)
    out["cards_show_all"] = _card_rows(page)
    shared.opts.set("lora_show_all", False)
    shared.opts.set("lora_hide_unknown_for_versions", ["SD1", "SDXL"])
    out["cards_hide_unknown"] = _card_rows(page)
    shared.opts.set("lora_hide_unknown_for_versions", [])
    shared.opts.set("lora_preferred_name", "Filename")
    out["cards_by_filename"] = _card_rows(page)
    shared.opts.set("lora_preferred_name", "Alias from file")

    # the page renders as the WebUI renders it, and its preview link is served by the WebUI's thumb route
    html = page.create_html("txt2img")
    out["html_has"] = {n: f"'{n}'" in html or f">{n}<" in html or n in html for n in out["cards"]}
    thumb = ui_extra_networks.fetch_file(str(lora_dir / f"{names[0]}.png"))
    out["thumb_served"] = type(thumb).__name__
    single = ui_extra_networks.get_single_card(page="lora", tabname="txt2img", name=names[1])
    out["single_card_has_name"] = names[1] in single.body.decode()
    page.refresh()

    # a card's text generates with the LoRA applied through our network
    driver.set_owner(True)
    base, _, _ = driver.generate("a cat")
    text = out["cards"]["aliased"]["text"]
    img, info, comments = driver.generate("a cat " + text)
    same, _, _ = driver.generate(f"a cat <lora:aliased:{out['default_multiplier']}>")
    out["card_generation"] = {"text": text, "effect": float(np.abs(img - base).mean()),
                              "diff_to_name_tag": int(np.abs(img - same).max()), "comments": comments,
                              "hashes": driver._infotext_field(info, "Lora hashes")}
    _, _, top_comments = driver.generate("a cat " + out["cards"]["/" + names[2]]["text"])
    out["card_generation_top_level_duplicate"] = {"comments": top_comments}

    client = TestClient(driver.APP)
    out["status"] = client.get("/lora_ext/status").json()
    out["sdapi_loras"] = _call(client, "GET", "/sdapi/v1/loras")
    shutil.copy(lora_dir / f"{names[0]}.safetensors", lora_dir / "added_later.safetensors")
    out["sdapi_refresh"] = _call(client, "POST", "/sdapi/v1/refresh-loras")
    out["sdapi_loras_after"] = [r["name"] for r in client.get("/sdapi/v1/loras").json()]
    out["files"] = made
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["routes", "no_builtin"])
    ap.add_argument("out")
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"])
    args, extra = ap.parse_known_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.scenario == "no_builtin":  # what the Extensions tab writes when the user unticks "Lora"
        (out / "data").mkdir(exist_ok=True)
        (out / "data" / "config.json").write_text(json.dumps({"disabled_extensions": ["Lora"]}))
    ckpt = os.environ["SD_WEBUI_CKPT_SDXL" if args.arch == "sdxl" else "SD_WEBUI_CKPT"]
    driver.run_scenario(out, ckpt, extra, lambda: globals()[f"scenario_{args.scenario}"](args), args.scenario)

if __name__ == "__main__":
    main()
