"""Every key spelling that real tools write must reach the same layers with the same delta as the kohya spelling.

One random LoRA (fixed factors, alpha == rank so that PEFT files, which carry no alpha, mean the same thing) is written
under each spelling and merged into a tiny pipeline; the merged weights must be bit-identical to those of the kohya
spelling. The spellings are written out here from the module paths of the model, following the tools that write them
(not from lora_ext's key maps):

- kohya sd-scripts: `lora_unet_<diffusers path>` (SD1/SD2) or `lora_unet_<ldm/sgm path>` (SDXL, and A1111/LyCORIS
  compvis files), `lora_te_` / `lora_te1_` + `lora_te2_` (SDXL) with `text_model.` paths, `.lora_down/.lora_up/.alpha`;
- A1111 also accepts `lora_te1_` on SD1 (its compvis fallback maps `lora_te1_text_model` to the one encoder);
- LyCORIS' standalone wrapper and SimpleTuner: `lycoris_<diffusers UNet path>` (ComfyUI maps it for the UNet);
- diffusers/PEFT: `unet.<path>.lora_A.weight` / `lora_B.weight`, `text_encoder.` / `text_encoder_2.`, no alpha;
  an adapter name (`.lora_A.default.weight`) when the state dict is taken from a PEFT model before saving;
  `base_model.model.<path>` when one PEFT-wrapped model is saved alone (`PeftModel.save_pretrained`);
- diffusers of the `LoRACompatibleLinear` era: `.lora.down.weight`; text encoder `.lora_linear_layer.down.weight`;
- the older diffusers attention-processor files: `<attn>.processor.to_q_lora.down.weight`, `to_out_lora` for `to_out.0`,
  with or without the `unet.` prefix, and the text encoder as `self_attn.to_q_lora` / `mlp.fc1.lora_linear_layer`
  (diffusers' `DIFFUSERS_OLD_TO_PEFT` table);
- transformers >= 5.6 module names: `text_encoder.encoder.layers...` without `text_model.`.

Also: PEFT DoRA (`lora_magnitude_vector`, written by peft itself) and kohya/LyCORIS `dora_scale` against peft's own
merge and a hand-computed DoRA merge; IA3 as LyCORIS' `IA3Module` saves it; a bundled embedding in A1111's layout;
junk keys reported; a file whose keys match nothing refused with a typed error.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from lora_ext.errors import LoraFileError
from lora_ext.formats.network import load_lora, parse_lora
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
from tests.lora_factory import Entry, assert_bit_identical, expected_state, make_entries, modules_of, snapshot, te_path

RANK = 4
TE_MULT, UNET_MULT = 0.8, 0.6


@pytest.fixture(scope="module")
def sd15():
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd15", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sdxl", seed=0)


# ------------------------------------------------------------------------------------------------ spelling helpers


def _us(path: str) -> str:
    return path.replace(".", "_")


def _te5(path: str) -> str:
    """transformers >= 5.6 CLIPTextModel path (no `text_model.`)."""
    return path.removeprefix("text_model.")


def _compvis(path: str) -> str:
    """diffusers UNet path of an attention-block layer -> the original ldm/sgm path (SD1.x and SDXL: 2 resnets per down
    level, 3 per up level), as A1111's convert_diffusers_name_to_compvis counts:
    down_blocks.i.attentions.j -> input_blocks.(3i+j+1).1, up_blocks.i.attentions.j -> output_blocks.(3i+j).1."""
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path)
    if m:
        i, j = int(m[2]), int(m[3])
        block = f"input_blocks.{3 * i + j + 1}" if m[1] == "down" else f"output_blocks.{3 * i + j}"
        return f"{block}.1.{m[4]}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path)
    if m:
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"not an attention-block path: {path}")


def _old_processor_unet(path: str, prefix: str) -> str:
    """`...attn1.to_q` -> `<prefix>...attn1.processor.to_q_lora`; `to_out.0` -> `processor.to_out_lora`."""
    m = re.fullmatch(r"(.+\.attn[12])\.(to_q|to_k|to_v|to_out)(\.0)?", path)
    if m is None:
        raise ValueError(path)
    return f"{prefix}{m[1]}.processor.{m[2]}_lora"


def _old_processor_te(path: str) -> str:
    """CLIP attention as the old processor names (`self_attn.to_q_lora`), MLP as `lora_linear_layer`."""
    m = re.fullmatch(r"(.+\.self_attn)\.(q|k|v|out)_proj", path)
    if m:
        return f"text_encoder.{m[1]}.to_{m[2]}_lora"
    return f"text_encoder.{path}.lora_linear_layer"


KOHYA = (".lora_down.weight", ".lora_up.weight")
PEFT = (".lora_A.weight", ".lora_B.weight")
PEFT_ADAPTER = (".lora_A.default.weight", ".lora_B.default.weight")
LORA_DOT = (".lora.down.weight", ".lora.up.weight")
LINEAR_LAYER = (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")
DOT = (".down.weight", ".up.weight")

Namer = Callable[[Entry], str]


def spell(entries: list[Entry], namer: Namer, suffixes: tuple[str, str], alpha: bool,
          components: tuple[str, ...]) -> dict[str, Tensor]:
    """A state dict of `entries` (those of `components`) with module names from `namer` and the given suffixes."""
    sd: dict[str, Tensor] = {}
    for e in entries:
        if e.component not in components:
            continue
        name = namer(e)
        sd[name + suffixes[0]] = e.tensors["lora_down.weight"].clone()
        sd[name + suffixes[1]] = e.tensors["lora_up.weight"].clone()
        if alpha:
            sd[name + ".alpha"] = e.tensors["alpha"].clone()
    return sd


def by_component(unet: Callable[[str], str], te1: Callable[[str], str],
                 te2: Callable[[str], str] | None = None) -> Namer:
    """A namer from one function per component; each gets the module path (text encoders: with `text_model.`)."""

    def namer(e: Entry) -> str:
        if e.component == "unet":
            return unet(e.path)
        fn = te1 if e.component == "te1" else te2
        if fn is None:
            raise ValueError(e.component)
        return fn(te_path(e.path))

    return namer


def kohya_sd1(e: Entry) -> str:
    return by_component(lambda p: "lora_unet_" + _us(p), lambda p: "lora_te_" + _us(p))(e)


def kohya_sdxl(e: Entry) -> str:
    return by_component(lambda p: "lora_unet_" + _us(p), lambda p: "lora_te1_" + _us(p),
                        lambda p: "lora_te2_" + _us(p))(e)


# (spelling id, namer, suffixes, has alpha, components written)
BOTH = ("unet", "te1")
SD15_SPELLINGS = [
    ("kohya_compvis", by_component(lambda p: "lora_unet_" + _us(_compvis(p)), lambda p: "lora_te_" + _us(p)),
     KOHYA, True, BOTH),
    ("lycoris_prefix", by_component(lambda p: "lycoris_" + _us(p), str), KOHYA, True, ("unet",)),
    ("a1111_lora_te1_on_sd1", by_component(lambda p: "lora_unet_" + _us(p), lambda p: "lora_te1_" + _us(p)),
     KOHYA, True, BOTH),
    ("diffusers_peft", by_component(lambda p: "unet." + p, lambda p: "text_encoder." + p), PEFT, False, BOTH),
    ("peft_adapter_name", by_component(lambda p: "unet." + p, lambda p: "text_encoder." + p), PEFT_ADAPTER, False,
     BOTH),
    ("peft_base_model_unet", by_component(lambda p: "base_model.model." + p, str), PEFT, False, ("unet",)),
    ("peft_base_model_text_encoder", by_component(str, lambda p: "base_model.model." + p), PEFT_ADAPTER, False,
     ("te1",)),
    ("diffusers_lora_dot", by_component(lambda p: "unet." + p, lambda p: "text_encoder." + p), LORA_DOT, False, BOTH),
    ("diffusers_lora_linear_layer", by_component(lambda p: "unet." + p, lambda p: "text_encoder." + p), LINEAR_LAYER,
     False, BOTH),
    ("diffusers_old_processors", by_component(lambda p: _old_processor_unet(p, "unet."), _old_processor_te), DOT,
     False, BOTH),
    ("diffusers_old_processors_no_prefix", by_component(lambda p: _old_processor_unet(p, ""), str), DOT, False,
     ("unet",)),
    ("transformers5_text_encoder", by_component(lambda p: "unet." + p, lambda p: "text_encoder." + _te5(p)), PEFT,
     False, BOTH),
    # kohya-style names written by a trainer running transformers >= 5.6 (CLIPTextModel without "text_model.")
    ("kohya_transformers5_text_encoder",
     by_component(lambda p: "lora_unet_" + _us(p), lambda p: "lora_te_" + _us(_te5(p))), KOHYA, True, BOTH),
]

SDXL_SPELLINGS = [
    ("kohya_compvis", by_component(lambda p: "lora_unet_" + _us(_compvis(p)), lambda p: "lora_te1_" + _us(p),
                                   lambda p: "lora_te2_" + _us(p)), KOHYA, True, ("unet", "te1", "te2")),
    ("diffusers_peft", by_component(lambda p: "unet." + p, lambda p: "text_encoder." + p,
                                    lambda p: "text_encoder_2." + p), PEFT, False, ("unet", "te1", "te2")),
    ("peft_adapter_name", by_component(lambda p: "unet." + p, lambda p: "text_encoder." + p,
                                       lambda p: "text_encoder_2." + p), PEFT_ADAPTER, False, ("unet", "te1", "te2")),
    ("transformers5_text_encoders", by_component(lambda p: "unet." + p, lambda p: "text_encoder." + _te5(p),
                                                 lambda p: "text_encoder_2." + _te5(p)), PEFT, False,
     ("unet", "te1", "te2")),
]


# ------------------------------------------------------------------------------------------------ the comparison


def _merge(pipe, sd: dict[str, Tensor], name: str) -> tuple[dict, object, object]:
    """Parse and apply `sd`; return (merged weights, parsed network, network report), then restore."""
    net = parse_lora(sd, name=name)
    patcher = Patcher(adapter_for_pipeline(pipe))
    rep = patcher.apply([ActiveLora(net, te=TE_MULT, unet=UNET_MULT)]).networks[0]
    merged = snapshot(pipe)
    patcher.restore()
    return merged, net, rep


class _Reference:
    """The kohya spelling's merged weights, per set of components (computed once per pipeline)."""

    def __init__(self, pipe, entries: list[Entry], namer: Namer) -> None:
        self.pipe, self.entries, self.namer = pipe, entries, namer
        self.original = snapshot(pipe)
        self._cache: dict[tuple[str, ...], dict] = {}

    def weights(self, components: tuple[str, ...]) -> dict:
        if components not in self._cache:
            sd = spell(self.entries, self.namer, KOHYA, True, components)
            merged, _, rep = _merge(self.pipe, sd, "kohya")
            subset = [e for e in self.entries if e.component in components]
            assert rep.modules_applied == len(subset) and not rep.unmatched, rep.summary()
            # the reference itself is the published formula (close) and really changes every targeted weight
            want = expected_state(self.pipe, subset, TE_MULT, UNET_MULT, self.original)
            for e in subset:
                key = f"{e.path}.weight"
                torch.testing.assert_close(merged[e.component][key], want[e.component][key], rtol=1e-5, atol=1e-6)
                assert not torch.equal(merged[e.component][key], self.original[e.component][key]), key
            self._cache[components] = merged
        return self._cache[components]


def alpha_count(keys: set[str], alpha: bool) -> int:
    return 0 if alpha else sum(k.endswith(".alpha") for k in keys)


def _check_spelling(pipe, ref: _Reference, sid: str, namer: Namer, suffixes, alpha: bool,
                    components: tuple[str, ...]) -> None:
    sd = spell(ref.entries, namer, suffixes, alpha, components)
    kohya_keys = set(spell(ref.entries, ref.namer, KOHYA, True, components))
    assert set(sd) != kohya_keys and len(sd) == len(kohya_keys) - alpha_count(kohya_keys, alpha)
    n = sum(e.component in components for e in ref.entries)
    merged, net, rep = _merge(pipe, sd, sid)
    assert net.unknown_keys == [] and len(net.modules) == n
    assert rep.unmatched == [] and rep.modules_applied == n, rep.summary()
    assert rep.ok
    assert_bit_identical(ref.weights(components), merged)
    assert_bit_identical(ref.original, snapshot(pipe))  # restored


@pytest.fixture(scope="module")
def sd15_ref(sd15):
    entries = make_entries(sd15, "lora", rank=RANK, alpha=float(RANK), seed=7, components=("unet", "te1"))
    assert {e.component for e in entries} == {"unet", "te1"}
    return _Reference(sd15, entries, kohya_sd1)


@pytest.fixture(scope="module")
def sdxl_ref(sdxl):
    entries = make_entries(sdxl, "lora", rank=2, alpha=2.0, seed=8, every=3)
    assert {e.component for e in entries} == {"unet", "te1", "te2"}
    return _Reference(sdxl, entries, kohya_sdxl)


@pytest.mark.parametrize("sid,namer,suffixes,alpha,components", SD15_SPELLINGS, ids=[s[0] for s in SD15_SPELLINGS])
def test_sd15_spelling_matches_kohya(sd15, sd15_ref, sid, namer, suffixes, alpha, components):
    _check_spelling(sd15, sd15_ref, sid, namer, suffixes, alpha, components)


@pytest.mark.parametrize("sid,namer,suffixes,alpha,components", SDXL_SPELLINGS, ids=[s[0] for s in SDXL_SPELLINGS])
def test_sdxl_spelling_matches_kohya(sdxl, sdxl_ref, sid, namer, suffixes, alpha, components):
    _check_spelling(sdxl, sdxl_ref, sid, namer, suffixes, alpha, components)


def test_spelled_names_look_like_the_tools_write_them(sd15_ref):
    """Guards the helpers above: a few names written out literally, as in the tools' own files and docs."""
    e = next(x for x in sd15_ref.entries if x.path == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    t = next(x for x in sd15_ref.entries if x.path.endswith("layers.0.self_attn.q_proj"))
    o = next(x for x in sd15_ref.entries if x.path == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
    assert kohya_sd1(e) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_sd1(t) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    spellings = {s[0]: s[1] for s in SD15_SPELLINGS}
    assert spellings["kohya_compvis"](e) == "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    assert spellings["diffusers_old_processors"](o) == \
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    assert spellings["diffusers_old_processors"](t) == "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora"
    assert spellings["transformers5_text_encoder"](t) == "text_encoder.encoder.layers.0.self_attn.q_proj"
    up = next(x for x in sd15_ref.entries if x.path == "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k")
    assert spellings["kohya_compvis"](up) == "lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_k"


# ------------------------------------------------------------------------------------------------------------ DoRA


def _peft_dora(model, targets: list[str], seed: int):
    """A DoRA adapter made by peft itself on a copy of `model`: (state dict as peft saves it, {layer: peft's merged
    weight}, {layer: (A, B, magnitude)}). Magnitudes are perturbed so that DoRA differs from plain LoRA."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    twin = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = LoraConfig(r=RANK, lora_alpha=RANK, use_dora=True, init_lora_weights=False, target_modules=targets)
        inject_adapter_in_model(cfg, twin)
        layers = {n: m for n, m in twin.named_modules() if isinstance(m, BaseTunerLayer)}
        for m in layers.values():
            mag = m.lora_magnitude_vector["default"]
            mag = getattr(mag, "weight", mag)  # peft >= 0.12: a DoraLinearLayer module; older: the Parameter
            mag.data.mul_(1 + 0.3 * torch.randn_like(mag))
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(twin).items()}
    factors = {n: (sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"], sd[f"{n}.lora_magnitude_vector"])
               for n in layers}
    merged = {}
    with torch.no_grad():
        for n, m in layers.items():
            m.merge()
            merged[n] = m.get_base_layer().weight.detach().clone()
    return sd, merged, factors


def _hand_dora(w0: Tensor, a: Tensor, b: Tensor, magnitude: Tensor) -> Tensor:
    """DoRA paper / PEFT: W' = m * (W + BA) / ||W + BA||, the norm per output row."""
    v = w0.double() + b.double() @ a.double()
    return (magnitude.double().reshape(-1, 1) * v / v.norm(dim=1, keepdim=True)).float()


def test_dora_peft_magnitude_and_kohya_dora_scale(sd15):
    original = snapshot(sd15)
    peft_sd, kohya_sd, oracle, hand, layers = {}, {}, {}, {}, []
    # peft names the text encoder's layers as the installed transformers does (5.x: "encoder.layers..."), as diffusers
    # would save them under "text_encoder."; the kohya copy uses kohya's "text_model." names
    for comp, model, prefix, kohya_prefix, targets, seed in (
            ("unet", sd15.unet, "unet.", "lora_unet_", ["to_k", "to_out.0"], 11),
            ("te1", sd15.text_encoder, "text_encoder.", "lora_te_", ["q_proj", "fc1"], 12)):
        sd, merged, factors = _peft_dora(model, targets, seed=seed)
        peft_sd.update({prefix + k: v for k, v in sd.items()})
        assert any(k.endswith(".lora_magnitude_vector") for k in sd)  # peft's saved name (adapter name removed)
        for path, (a, b, mag) in factors.items():
            name = kohya_prefix + _us(te_path(path) if comp == "te1" else path)
            kohya_sd.update({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b,
                             f"{name}.alpha": torch.tensor(float(RANK)),
                             f"{name}.dora_scale": mag.reshape(-1, 1)})  # LyCORIS wd_on_out layout (out, 1)
            w0 = original[comp][f"{path}.weight"]
            oracle[(comp, path)] = merged[path]
            hand[(comp, path)] = _hand_dora(w0, a, b, mag)
            layers.append((comp, path))
            plain = w0 + b @ a
            assert not torch.allclose(hand[(comp, path)], plain, rtol=1e-3, atol=1e-4)  # DoRA is not plain LoRA here

    results = {}
    for style, sd in (("peft", peft_sd), ("kohya", kohya_sd)):
        net = parse_lora(sd, name=f"dora_{style}")
        assert net.unknown_keys == [] and net.algorithms == {"lora+dora": len(layers)}
        p = Patcher(adapter_for_pipeline(sd15))
        rep = p.apply([ActiveLora(net)]).networks[0]
        assert rep.modules_applied == len(layers) and not rep.unmatched, rep.summary()
        results[style] = snapshot(sd15)
        for comp, path in layers:
            got = results[style][comp][f"{path}.weight"]
            torch.testing.assert_close(got, hand[(comp, path)], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got, oracle[(comp, path)], rtol=1e-5, atol=1e-6)
        # A1111 semantics for a multiplier: W + m * (W' - W)
        p.apply([ActiveLora(net, te=0.5, unet=0.5)])
        half = snapshot(sd15)
        for comp, path in layers:
            w0 = original[comp][f"{path}.weight"]
            torch.testing.assert_close(half[comp][f"{path}.weight"], w0 + 0.5 * (hand[(comp, path)] - w0),
                                       rtol=1e-5, atol=1e-6)
        p.restore()
        assert_bit_identical(original, snapshot(sd15))
    assert_bit_identical(results["peft"], results["kohya"])


# ------------------------------------------------------------------------------------------------------------- IA3


def test_ia3_as_lycoris_saves_it(sd15, tmp_path):
    """LyCORIS `IA3Module` state dicts (`weight` + 0-d int64 `on_input`), kohya names; merged weights equal LyCORIS'
    own `get_merged_weight` (W * (1 + multiplier * w)), also after LyCORIS' fp16 save cast of every tensor."""
    from lycoris.modules.ia3 import IA3Module

    original = snapshot(sd15)
    mods = modules_of(sd15)
    chosen = [("unet", p, p.endswith("ff.net.2")) for p in mods["unet"] if p.endswith(("attn2.to_k", "ff.net.2"))]
    chosen += [("te1", p, p.endswith("mlp.fc2")) for p in mods["te1"] if p.endswith(("self_attn.v_proj", "mlp.fc2"))]
    assert {flag for *_, flag in chosen} == {True, False}
    g = torch.Generator().manual_seed(3)
    sd, want = {}, {}
    for comp, path, on_input in chosen:
        name = ("lora_unet_" + _us(path)) if comp == "unet" else ("lora_te_" + _us(te_path(path)))
        ia3 = IA3Module(name, mods[comp][path], train_on_input=on_input)
        with torch.no_grad():
            ia3.weight.copy_((torch.randn(ia3.weight.shape, generator=g) * 0.3).half().float())
            mult = UNET_MULT if comp == "unet" else TE_MULT
            want[(comp, path)] = ia3.get_merged_weight(multiplier=mult)[0].detach().clone()
        state = ia3.state_dict()
        assert set(state) == {"weight", "on_input"}
        assert state["on_input"].dim() == 0 and state["on_input"].dtype == torch.int64
        sd.update({f"{name}.{k}": v.detach().clone() for k, v in state.items()})
    assert_bit_identical(original, snapshot(sd15))  # building the LyCORIS modules did not touch the model

    results = []
    for variant, tensors in (("int64", sd), ("fp16", {k: v.to(torch.float16) for k, v in sd.items()})):
        path = tmp_path / f"ia3_{variant}.safetensors"
        save_file(tensors, str(path), {"ss_network_module": "lycoris.kohya"})
        net = load_lora(path)
        assert net.unknown_keys == [] and net.algorithms == {"ia3": len(chosen)}
        p = Patcher(adapter_for_pipeline(sd15))
        rep = p.apply([ActiveLora(net, te=TE_MULT, unet=UNET_MULT)]).networks[0]
        assert rep.modules_applied == len(chosen) and rep.ok, rep.summary()
        now = snapshot(sd15)
        for comp, layer, _ in chosen:
            got = now[comp][f"{layer}.weight"]
            torch.testing.assert_close(got, want[(comp, layer)], rtol=1e-6, atol=1e-6)
            assert not torch.equal(got, original[comp][f"{layer}.weight"])
        results.append(now)
        p.restore()
        assert_bit_identical(original, snapshot(sd15))
    assert_bit_identical(results[0], results[1])


# --------------------------------------------------------------------------- bundled embeddings, junk, no match


def test_bundled_embedding_is_kept_not_unknown(sd15, sd15_ref):
    """A1111 `networks.load_network`: `bundle_emb.<name>.string_to_param.*` (SD1) and `bundle_emb.<name>.clip_l` /
    `.clip_g` (SDXL); the embedding name is what lies between the first two dots."""
    sd = spell(sd15_ref.entries, kohya_sd1, KOHYA, True, BOTH)
    vec = torch.randn(3, 32)
    sd["bundle_emb.my_token.string_to_param.*"] = vec
    sd["bundle_emb.xl_token.clip_l"] = torch.randn(2, 768)
    sd["bundle_emb.xl_token.clip_g"] = torch.randn(2, 1280)
    net = parse_lora(sd, name="with_emb")
    assert net.unknown_keys == []
    assert set(net.bundled_embeddings) == {"my_token", "xl_token"}
    assert torch.equal(net.bundled_embeddings["my_token"]["string_to_param.*"], vec)
    assert set(net.bundled_embeddings["xl_token"]) == {"clip_l", "clip_g"}
    assert len(net.modules) == len(sd15_ref.entries)
    p = Patcher(adapter_for_pipeline(sd15))
    rep = p.apply([ActiveLora(net, te=TE_MULT, unet=UNET_MULT)]).networks[0]
    assert rep.ok and rep.unknown_keys == [] and rep.modules_applied == len(sd15_ref.entries)
    assert_bit_identical(sd15_ref.weights(BOTH), snapshot(sd15))
    p.restore()
    # a file holding only an embedding parses (nothing to patch, nothing unknown)
    only = parse_lora({"bundle_emb.solo.string_to_param.*": vec}, name="emb_only")
    assert only.modules == {} and only.unknown_keys == [] and set(only.bundled_embeddings) == {"solo"}


def test_junk_keys_are_reported_not_dropped(sd15, sd15_ref):
    sd = spell(sd15_ref.entries, kohya_sd1, KOHYA, True, BOTH)
    sd["foo.bar"] = torch.zeros(2)
    stray = "lora_unet_no_such_block_attn1_to_q"  # LoRA-shaped, but no layer has that name
    sd[f"{stray}.lora_down.weight"] = torch.zeros(RANK, 32)
    sd[f"{stray}.lora_up.weight"] = torch.zeros(32, RANK)
    net = parse_lora(sd, name="junk")
    assert net.unknown_keys == ["foo.bar"]
    p = Patcher(adapter_for_pipeline(sd15))
    checked = p.check([ActiveLora(net)]).networks[0]
    rep = p.apply([ActiveLora(net, te=TE_MULT, unet=UNET_MULT)]).networks[0]
    for r in (checked, rep):
        assert r.unknown_keys == ["foo.bar"] and r.unmatched == [stray] and not r.ok
        assert "foo.bar" in r.summary() and stray in r.summary()
        assert r.to_dict()["unknown_keys"] == ["foo.bar"]
    assert rep.modules_applied == len(sd15_ref.entries)
    assert_bit_identical(sd15_ref.weights(BOTH), snapshot(sd15))  # the rest applied as usual
    p.restore()
    assert_bit_identical(sd15_ref.original, snapshot(sd15))


def test_files_that_match_nothing_raise_typed_errors(sd15, sd15_ref):
    # nothing in the file is a LoRA tensor (here: pieces of a full checkpoint and junk)
    with pytest.raises(LoraFileError, match="no LoRA tensors"):
        parse_lora({"foo.bar": torch.zeros(2), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)},
                   path="not_a_lora.safetensors")
    # LoRA tensors, but for layers this model does not have: refused, weights untouched
    sd = {}
    for i in range(3):
        sd[f"lora_unet_not_here_{i}.lora_down.weight"] = torch.randn(RANK, 32)
        sd[f"lora_unet_not_here_{i}.lora_up.weight"] = torch.randn(32, RANK)
    net = parse_lora(sd, path="elsewhere.safetensors")
    p = Patcher(adapter_for_pipeline(sd15))
    with pytest.raises(LoraFileError, match="none of its 3 modules") as err:
        p.apply([ActiveLora(net)])
    assert "elsewhere.safetensors" in str(err.value)
    assert_bit_identical(sd15_ref.original, snapshot(sd15))
    rep = p.check([ActiveLora(net)]).networks[0]
    assert rep.error and "none of its 3 modules" in rep.error
    assert_bit_identical(sd15_ref.original, snapshot(sd15))
