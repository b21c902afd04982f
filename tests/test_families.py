"""lora_ext.families is the one vocabulary of model families: the shipped configs agree with what it declares, every
caller reads its names from it (aliases, errors), and unknown names are refused with the valid ones listed."""

from __future__ import annotations

import pytest

from lora_ext import families
from lora_ext.errors import ConfigError, DatasetError, ModelLoadError
from lora_ext.families import EPSILON, V_PREDICTION
from lora_ext.formats import metadata as fmeta
from lora_ext.formats.arch import ArchGuess
from lora_ext.library import cache as lcache
from lora_ext.models import assets, convert, loading
from lora_ext.train import config as tconfig
from lora_ext.train import export
from lora_ext.train.dataset import spec as dspec

FAMS = list(families.FAMILIES.values())


# -------------------------------------------------------------------------------------------------- the vocabulary


def test_supported_and_recognised_families():
    assert families.SUPPORTED == ("sd1", "sd2", "sdxl")
    assert families.KNOWN == ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux")
    assert families.SD_VERSIONS == ("SD1", "SD2", "SDXL")
    assert [families.label(f) for f in families.KNOWN] == ["SD1.x", "SD2.x", "SDXL", "the SDXL refiner", "SD3",
                                                             "FLUX.1"]
    assert families.label("nope") == "nope" and families.label(None, "unknown") == "unknown"


@pytest.mark.parametrize(("name", "fid"), [
    ("sd1", "sd1"), ("SD1", "sd1"), (" sd15 ", "sd1"), ("sd1.5", "sd1"),
    ("sd2", "sd2"), ("sd2-base", "sd2"), ("sd21", "sd2"), ("sd21-v", "sd2"), ("sd2-v", "sd2"),
    ("sdxl", "sdxl"), ("SDXL-base", "sdxl"),
])
def test_aliases(name, fid):
    assert families.normalise_family(name) == fid
    assert families.family(name) is families.FAMILIES[fid]


def test_alias_table_is_built_from_the_families_and_names_no_family_twice():
    assert set(families.ALIASES.values()) <= set(families.SUPPORTED)
    assert not set(families.ALIASES) & set(families.SUPPORTED)
    assert {a: f.id for f in FAMS for a in f.aliases} == families.ALIASES


@pytest.mark.parametrize("bad", ["sd3", "flux", "", "sd4"])
def test_unknown_family_lists_the_valid_names(bad):
    with pytest.raises(families.UnknownFamilyError, match="valid: sd1, sd2, sdxl") as e:
        families.family(bad)
    assert isinstance(e.value, ValueError) and "sd15" in str(e.value)


@pytest.mark.parametrize(("value", "want"), [
    ("epsilon", EPSILON), ("EPS", EPSILON), ("v", V_PREDICTION), ("v_prediction", V_PREDICTION),
    ("V-Prediction", V_PREDICTION), ("v_pred", V_PREDICTION),
])
def test_prediction_spellings(value, want):
    assert families.normalise_prediction(value) == want
    assert families.is_v_prediction(value) == (want == V_PREDICTION)


def test_unknown_prediction_type():
    assert families.is_v_prediction(None) is False
    with pytest.raises(families.UnknownFamilyError, match="epsilon, v_prediction"):
        families.normalise_prediction("x0")


@pytest.mark.parametrize(("fid", "pred", "px"), [
    ("sd1", None, 512), ("sd1", "v", 512), ("sd2", "epsilon", 512), ("sd2", "v_prediction", 768),
    ("sdxl", None, 1024),
])
def test_default_resolution_everywhere(fid, pred, px):
    assert families.default_resolution(fid, pred) == px
    assert tconfig.TrainConfig().resolved_resolution(fid, pred or "epsilon") == px
    assert dspec.default_resolution(fid, families.is_v_prediction(pred)) == px
    built = export.build_metadata({}, None, fid, prediction_type=pred or "epsilon")
    assert built["modelspec.resolution"] == f"{px}x{px}"


# ------------------------------------------------------------------------------- the shipped files agree with it


@pytest.mark.parametrize("fam", FAMS, ids=lambda f: f.id)
@pytest.mark.parametrize("pred", families.PREDICTION_TYPES)
def test_shipped_configs_agree_with_the_family(fam, pred):
    name = fam.config(pred)
    assert name in families.CONFIG_NAMES and assets.config_dir(name).is_dir()
    unet, vae = assets.load_config(name, "unet"), assets.load_config(name, "vae")
    assert unet["cross_attention_dim"] == fam.context_dim
    assert vae["scaling_factor"] == fam.vae_scaling_factor
    tes = ["text_encoder", "text_encoder_2"][:len(fam.tokenizers)]
    assert [assets.load_config(name, t)["hidden_size"] for t in tes] == list(fam.text_widths)
    if fam.unet_heads is not None:
        assert unet["attention_head_dim"] == fam.unet_heads  # diffusers' name for the SD1 head count
    sched = assets.load_config(name, "scheduler")["prediction_type"]
    if sched == pred:  # a family with a config of its own for this prediction type: sized for its resolution
        assert unet["sample_size"] * 8 == fam.default_resolution(pred)
    assert fam.image_size in (fam.default_resolution(EPSILON), fam.default_resolution(V_PREDICTION))
    assert set(fam.tokenizers) <= set(assets.TOKENIZER_KINDS)


def test_every_shipped_config_belongs_to_a_family():
    on_disk = sorted(p.name for p in (assets.DATA_DIR / "configs").iterdir() if p.is_dir())
    assert on_disk == sorted(families.CONFIG_NAMES)


@pytest.mark.parametrize(("name", "config"), [
    ("sd1", "sd15"), ("sd15", "sd15"), ("sd2", "sd2-base"), ("sd2-base", "sd2-base"), ("sd21", "sd21-v"),
    ("sd2-v", "sd21-v"), ("sd21-v", "sd21-v"), ("sdxl", "sdxl-base"),
])
def test_shipped_config_names(name, config):
    assert families.shipped_config(name) == config
    assert assets.config_dir(name).name == config


# ------------------------------------------------------------------------------------- the callers use the table


@pytest.mark.parametrize("fam", FAMS, ids=lambda f: f.id)
def test_export_spellings_come_from_the_family(fam):
    for pred in families.PREDICTION_TYPES:
        assert export.base_model_version(fam.id, pred) == fam.ss_base_model_version[pred]
        assert export.modelspec_architecture(fam.id, pred) == fam.modelspec_architecture[pred] + "/lora"
    meta = export.build_metadata({}, None, fam.id)
    # what we write reads back as this family, with A1111's own rule and with ours
    assert fmeta.a1111_sd_version(meta) == fam.id and fmeta.base_model_from_metadata(meta) == fam.id
    assert export.sidecar_json(fam.id, None, meta)["sd version"] == fam.sd_version


def test_the_sd_scripts_and_modelspec_spellings():
    assert [export.base_model_version(f) for f in ("sd1", "sd2", "sdxl")] == ["sd_v1", "sd_v2", "sdxl_base_v1-0"]
    assert export.base_model_version("sd2", "v") == "sd_v2_v" and export.base_model_version("sd1", "v") == "sd_v1_v"
    assert export.modelspec_architecture("sd2", "v") == "stable-diffusion-v2-768-v/lora"


def test_callers_keep_their_error_types_and_list_the_valid_names():
    with pytest.raises(ValueError, match="valid: sd1, sd2, sdxl"):
        export.build_metadata({}, None, "sd3")
    with pytest.raises(ModelLoadError, match="valid: sd1, sd2, sdxl"):
        loading._normalise_family("flux")
    with pytest.raises(ModelLoadError, match="epsilon, v_prediction"):
        loading._normalise_prediction("x0")
    with pytest.raises(ModelLoadError, match="sd15, sd2-base"):
        assets.config_dir("sd3")
    with pytest.raises(DatasetError, match="valid: sd1, sd2, sdxl"):
        dspec.default_resolution("sd3")
    with pytest.raises(ConfigError, match="prediction_type"):
        tconfig.TrainConfig(pretrained_model="m", train_data_dir="d", output_name="o", prediction_type="v").validate()


def test_derived_tables_of_other_modules():
    assert (*families.SD_VERSIONS, "Unknown") == lcache.SD_VERSIONS
    assert fmeta.BASE_MODELS == families.KNOWN
    assert tuple(convert.TE_PREFIXES) == families.SUPPORTED
    assert ArchGuess("sd2", "", None).label == "SD2.x" and ArchGuess(None, "", None).label == "unknown"
    assert loading._scheduler_config_name("sd2", V_PREDICTION) == "sd21-v"
    assert loading._scheduler_config_name("sd1", V_PREDICTION) == "sd15"


def test_families_is_stdlib_only():
    import ast
    import sys
    from pathlib import Path

    tree = ast.parse(Path(families.__file__).read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
