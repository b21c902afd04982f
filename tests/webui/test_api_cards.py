"""lora_ext's REST routes and "Lora" cards page inside a real AUTOMATIC1111 WebUI v1.10 (tests/webui/driver_api.py runs
each scenario in its own WebUI process; these tests assert on what it recorded).

References: the built-in Lora extension's own reading of the same files in the same process (its alias, SD version,
`networks.load_network` module matches on the loaded model, its /sdapi/v1/loras format) and its card prompt formula
(`ui_extra_networks_lora.create_item`), written out here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import lora_ext
from tests.webui.conftest import scenario_runner

DRIVER = Path(__file__).with_name("driver_api.py")
HARNESS_FILES = {"sd1": ["tiny_lora", "tiny_lora_compvis"], "sdxl": ["tiny_sdxl_lora"]}


@pytest.fixture(scope="session")
def run_api(tmp_path_factory):
    """run_api(scenario, arch="sd1") -> the scenario's result dict (cached per session)."""
    return scenario_runner(tmp_path_factory, DRIVER)


def _route_modules(res: dict, path: str) -> list[str]:
    return [module for p, module in res["routes"] if p == path]


# ----------------------------------------------------------------------------------- built-in Lora loaded


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_status_and_listing_agree_with_the_builtin(run_api, arch):
    res = run_api("routes", arch)
    builtin = res["builtin"]
    st = res["status"]
    assert st["status"] == 200
    s = st["json"]
    assert s["owner"] == "lora_ext.webui.glue" and s["handles_tags"] is True
    assert s["previous"] == "extra_networks_lora" and s["version"] == lora_ext.__version__
    assert s["loras"] == len(builtin) and s["active"] == []
    rows = {r["name"]: r for r in res["list"]["json"]}
    assert set(rows) == set(builtin)
    for name, ref in builtin.items():
        row = rows[name]
        assert row["alias"] == ref["alias"], name
        assert Path(row["path"]) == Path(ref["filename"]), name
        if name == "other_family":  # no metadata: the built-in says Unknown; the second-encoder keys say SDXL
            assert ref["sd_version"] == "Unknown" and row["sd_version"] == "SDXL"
            assert row["sd_version_source"] == "keys"
        else:
            assert row["sd_version"] == ref["sd_version"], name
    assert rows["broken"]["problems"] and "broken.safetensors" in rows["broken"]["problems"][0]
    first = res["first"]
    assert [r["name"] for r in res["search"]["json"]] == [first]
    expected_xl = {"other_family"} if arch == "sd1" else set(builtin) - {"broken"}
    assert {r["name"] for r in res["filter_sdxl"]["json"]} == expected_xl


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_detail_coverage_matches_the_builtins_module_matching(run_api, arch):
    res = run_api("routes", arch)
    made = set(res["files"]) | {"other_family"} if arch == "sd1" else set(res["files"])
    assert set(HARNESS_FILES[arch]) <= made  # files written by the harness's own script are among them
    for name in made:
        ref = res["builtin"][name]
        got = res["details"][name]
        assert got["status"] == 200, (name, got)
        d = got["json"]
        cov = d["coverage"]
        assert d["coverage_reason"] is None and cov["model_arch"] == arch
        assert cov["modules_applied"] == ref["matched_modules"], name
        assert d["metadata"] == ref["metadata"], name
        if name == "other_family":
            assert ref["matched_modules"] == 0 and "SDXL" in cov["error"]
        else:
            assert cov["error"] is None and cov["unmatched"] == [] and cov["modules_total"] == cov["modules_applied"]
            assert d["file"]["modules"] == cov["modules_total"]
    broken = res["details"]["broken"]
    assert "error" in res["builtin"]["broken"]
    assert broken["status"] == 422 and "broken.safetensors" in broken["json"]["detail"]["error"]
    assert res["unknown"]["status"] == 404 and res["unknown"]["json"]["detail"]["name"] == "does_not_exist"


def test_preview_refresh_and_builtin_routes(run_api):
    res = run_api("routes")
    first = res["first"]
    rows = {r["name"]: r for r in res["list"]["json"]}
    assert rows[first]["preview"] == f"/lora_ext/preview/{first}"
    assert all(r["preview"] is None for n, r in rows.items() if n != first)
    assert res["preview"]["status"] == 200 and res["preview"]["content_type"] == "image/png"
    assert res["preview_same_bytes"] is True
    assert set(res["preview_refused"].values()) == {404}, res["preview_refused"]
    assert res["count_before_refresh"] == len(res["builtin"])
    assert res["refresh"]["status"] == 200 and res["refresh"]["json"] == {"count": len(res["builtin"]) + 1}
    # the built-in serves its own routes; ours are not added twice
    assert _route_modules(res, "/sdapi/v1/loras") == ["lora_script.py"]
    assert _route_modules(res, "/sdapi/v1/refresh-loras") == ["lora_script.py"]
    assert _route_modules(res, "/lora_ext/status") == ["lora_ext.webui.api"]
    assert res["sdapi_loras"]["status"] == 200
    # its cards page stays, ours is not registered
    assert [m for t, m in res["pages"] if t == "Lora"] == ["ui_extra_networks_lora"]


def test_status_shows_merged_loras_during_a_generation(run_api):
    res = run_api("routes")
    during = res["status_during"]
    assert during and all(s["active"] == [res["first"]] and s["backup_mib"] > 0 for s in during)
    assert res["status_after"]["active"] == [] and res["status_after"]["handles_tags"] is True
    back = res["status_handed_back"]
    assert back["owner"] == "extra_networks_lora" and back["handles_tags"] is False


# --------------------------------------------------------------------------------- built-in Lora disabled


def _expected_text(name: str, mult: float, alias: str | None = None, weight: object = None,
                   activation: str | None = None) -> str:
    """The built-in's card text: `<lora:ALIAS:` + (preferred weight or the default multiplier) + `>` + activation."""
    text = f"<lora:{alias or name}:{weight if weight else mult}>"
    return text + (" " + activation if activation else "")


def test_cards_page_replaces_the_builtin_page(run_api):
    res = run_api("no_builtin")
    assert res["builtin_enabled"] == [False] and res["builtin_modules_loaded"] == []
    assert [m for t, m in res["pages"] if t == "Lora"] == ["lora_ext.webui.cards"]
    assert res["lora_dir"] in res["allowed_dirs"]
    mult = res["default_multiplier"]
    names = list(res["files"])
    cards = res["cards"]
    # other_family (SDXL) hidden on SD1; names[2] twice: the name reaches sub/, the top-level file is "/name"
    assert set(cards) == set(names) | {"aliased", "unknown_version", "/" + names[2]}
    assert Path(cards[names[2]]["filename"]) == Path(res["lora_dir"]) / "sub" / f"{names[2]}.safetensors"
    assert Path(cards["/" + names[2]]["filename"]) == Path(res["lora_dir"]) / f"{names[2]}.safetensors"
    for name, card in cards.items():
        if name == "aliased":
            assert card["text"] == _expected_text(name, mult, alias="My Alias")
        elif name == names[1]:
            assert card["text"] == _expected_text(name, mult, weight=0.6, activation="trig word")
            assert card["negative_prompt"] == '"(ugly:1)"'
        else:
            assert card["text"] == _expected_text(name, mult), name
            assert card["negative_prompt"] == '""'
    assert cards[names[0]]["prompt"] == f'"<lora:{names[0]}:" + opts.extra_networks_default_multiplier + ">"'
    assert cards[names[0]]["preview"].startswith("./sd_extra_networks/thumb?filename=")
    assert f"{names[0]}.png" in cards[names[0]]["preview"]
    assert all(c["preview"] is None for n, c in cards.items() if n != names[0])
    assert cards[names[0]]["description"] == "a description"
    assert cards["unknown_version"]["sd_version"] == "Unknown"
    assert all(c["search_terms"][0].endswith(f"{n}.safetensors") for n, c in cards.items())


def test_cards_follow_the_builtins_settings(run_api):
    res = run_api("no_builtin")
    mult = res["default_multiplier"]
    assert res["cards_show_all"]["other_family"]["sd_version"] == "SDXL"
    assert set(res["cards_show_all"]) == set(res["cards"]) | {"other_family"}
    assert set(res["cards_hide_unknown"]) == set(res["cards"]) - {"unknown_version"}
    assert res["cards_by_filename"]["aliased"]["text"] == _expected_text("aliased", mult)


def test_cards_render_and_their_text_applies_the_lora(run_api):
    res = run_api("no_builtin")
    assert all(res["html_has"].values()), res["html_has"]
    assert res["thumb_served"] == "FileResponse" and res["single_card_has_name"] is True
    gen = res["card_generation"]
    assert gen["text"] == "<lora:My Alias:" + str(res["default_multiplier"]) + ">"
    assert gen["effect"] > 0.5 and gen["diff_to_name_tag"] == 0 and gen["comments"] == ""
    assert gen["hashes"].startswith("My Alias: ")
    assert res["card_generation_top_level_duplicate"]["comments"] == ""
    assert res["status"]["owner"] == "lora_ext.webui.glue" and res["status"]["previous"] is None


def test_sdapi_loras_served_in_the_builtin_format(run_api):
    res = run_api("no_builtin")
    assert _route_modules(res, "/sdapi/v1/loras") == ["lora_ext.webui.api"]
    assert _route_modules(res, "/sdapi/v1/refresh-loras") == ["lora_ext.webui.api"]
    rows = res["sdapi_loras"]["json"]
    assert res["sdapi_loras"]["status"] == 200
    assert all(set(r) == {"name", "alias", "path", "metadata"} for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(res["files"]) | {"aliased", "unknown_version", "other_family"}
    assert by_name["aliased"]["alias"] == "My Alias"
    assert by_name["aliased"]["metadata"] == {"ss_output_name": "My Alias"}
    assert Path(by_name["aliased"]["path"]) == Path(res["lora_dir"]) / "aliased.safetensors"
    assert res["sdapi_refresh"]["status"] == 200 and res["sdapi_refresh"]["json"] is None
    assert "added_later" in res["sdapi_loras_after"]
