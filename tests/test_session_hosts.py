"""One activation path for both hosts: the same prompt through the CLI (`lora_ext.app.runner`, a diffusers pipeline
sampling for real) and through the WebUI glue (`glue._activate`'s session on A1111's ldm tree, steps driven by
`glue._on_cfg_denoiser` as A1111's sampler drives it) gives the same weights at every sampling step.

The reference is independent of the session code: the ldm tree's weights are converted back to diffusers names
(`unet_ldm_to_diffusers`, checked against ldm itself in test_layouts_convert.py) and compared with the pipeline's own
weights as its UNet sees them at each step (a forward pre-hook). The "Lora hashes" values are checked against the
addnet hash (A1111's rule, tested in test_file_io.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lora_ext.formats.hashes import addnet_hash_safetensors
from lora_ext.formats.infotext import format_lora_hashes
from lora_ext.formats.safetensors_io import save_safetensors_atomic
from lora_ext.models.convert import unet_diffusers_to_ldm, unet_ldm_to_diffusers
from lora_ext.models.tiny import build_tiny_pipeline
from lora_ext.patch import adapter_for_pipeline
from lora_ext.patch.synth import SynthSpec, make_lora_tensors
from lora_ext.patch.targets import selector
from lora_ext.prompt import parse_prompt
from lora_ext.session import LoraSession
from lora_ext.webui import glue
from lora_ext.webui.state import GlueState
from tests.test_layouts_convert import ldm_unet_cls  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

STEPS = 6
# two LoRAs; te/unet multipliers; lbw (INALL: only input blocks and the text encoder); a fractional start
# (floor(0.25 * 6) = 1: steps 1..5) and an integer stop (steps 0..2)
PROMPT = "a cat <lora:ink:0.8:0.6:lbw=INALL:start=0.25> <lora:dots:te=0.3:unet=1.2:stop=3>"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, ldm_unet_cls):  # noqa: F811
    from diffusers import EulerDiscreteScheduler

    pipe = build_tiny_pipeline("sd15")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    cfg = pipe.unet.config
    ch = list(cfg.block_out_channels)
    ldm_unet = ldm_unet_cls(image_size=32, in_channels=4, out_channels=4, model_channels=ch[0],
                            attention_resolutions=[4, 2, 1], num_res_blocks=cfg.layers_per_block,
                            channel_mult=[c // ch[0] for c in ch], num_heads=cfg.attention_head_dim,
                            use_spatial_transformer=True, transformer_depth=1, context_dim=cfg.cross_attention_dim,
                            legacy=False)
    ldm_unet.load_state_dict(unet_diffusers_to_ldm(pipe.unet.state_dict(), cfg), strict=True)
    te = copy.deepcopy(pipe.text_encoder)
    sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=ldm_unet),  # A1111's tree, hijack-wrapped TE
                               cond_stage_model=SimpleNamespace(wrapped=SimpleNamespace(transformer=te)))
    lora_dir = tmp_path_factory.mktemp("hosts") / "Lora"
    lora_dir.mkdir()
    adapter = adapter_for_pipeline(pipe)
    for seed, name in enumerate(("ink", "dots"), start=1):
        tensors = make_lora_tensors(adapter, SynthSpec(rank=4, alpha=2.0, std=0.3), selector("attn"), seed=seed)
        save_safetensors_atomic(tensors, lora_dir / f"{name}.safetensors")
    return SimpleNamespace(pipe=pipe, sd_model=sd_model, lora_dir=lora_dir)


def _cli_weights(hosts, tmp_path, prompt: str = PROMPT) -> tuple[list[dict], dict, str]:
    """The pipeline's UNet weights at each of its calls, its TE weights when it encodes, and the PNG's parameters."""
    from lora_ext.app.runner import Session

    pipe = hosts.pipe
    unet_steps: list[dict] = []
    te_seen: list[dict] = []
    hooks = [pipe.unet.register_forward_pre_hook(lambda m, a: unet_steps.append(_clone(m))),
             pipe.text_encoder.register_forward_pre_hook(lambda m, a: te_seen.append(_clone(m)))]
    try:
        session = Session(tmp_path / "model", pipe=pipe, arch="sd1", lora_dirs=[hosts.lora_dir])
        res = session.generate(prompt, seed=3, steps=STEPS, width=64, height=64, cfg=7.0, out=tmp_path / "cli.png")
    finally:
        for h in hooks:
            h.remove()
    assert res.warnings == [] and [n.modules_applied > 0 for n in res.report.networks] == [True, True]
    assert session.patcher.is_pristine
    return unet_steps, te_seen[0], Image.open(tmp_path / "cli.png").info["parameters"]


def _webui_weights(hosts, monkeypatch, prompt: str = PROMPT) -> tuple[list[dict], dict, dict[str, str]]:
    """The ldm tree's weights (diffusers names) at each step, as the glue sets them for A1111's sampler."""
    st = GlueState.create([hosts.lora_dir], None)
    monkeypatch.setattr(glue, "_state", st)
    _, refs = parse_prompt(prompt)
    act = st.session.activate(hosts.sd_model, [r.tag for r in refs])
    assert act.problems == [] and act.applied == ["ink", "dots"]
    te = _clone(hosts.sd_model.cond_stage_model.wrapped.transformer)  # A1111 encodes the prompt before sampling
    unet = hosts.sd_model.model.diffusion_model
    steps = []
    for i in range(STEPS):  # A1111's CFGDenoiser counts its calls; sampling_step lags by one
        glue._on_cfg_denoiser(SimpleNamespace(total_sampling_steps=STEPS, sampling_step=max(i - 1, 0),
                                              denoiser=SimpleNamespace(total_steps=STEPS, step=i)))
        steps.append(unet_ldm_to_diffusers({k: v.detach().clone() for k, v in unet.state_dict().items()},
                                           hosts.pipe.unet.config))
    st.session.restore()
    return steps, te, act.hashes


def _clone(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{what}: {k}: {m}")


def test_cli_and_webui_paths_patch_the_same_weights_at_every_step(hosts, tmp_path, monkeypatch):
    base_unet, base_te = _clone(hosts.pipe.unet), _clone(hosts.pipe.text_encoder)
    cli_steps, cli_te, parameters = _cli_weights(hosts, tmp_path)
    web_steps, web_te, web_hashes = _webui_weights(hosts, monkeypatch)

    assert len(cli_steps) == len(web_steps) == STEPS
    _assert_same(cli_te, web_te, "text encoder")
    for i, (cli, web) in enumerate(zip(cli_steps, web_steps, strict=True)):
        _assert_same(cli, web, f"unet at step {i}")
    # non-trivial: the LoRAs change the text encoder; the UNet differs from the base at every step, and the windows
    # make it change during sampling: step 0 (dots only), 1..2 (both), 3..5 (ink only)
    assert any(not torch.equal(cli_te[k], base_te[k]) for k in base_te)
    changed = [{k for k in base_unet if not torch.equal(s[k], base_unet[k])} for s in cli_steps]
    assert all(changed)

    def same(i: int, j: int) -> bool:
        return all(torch.equal(cli_steps[i][k], cli_steps[j][k]) for k in base_unet)

    assert [same(i, i + 1) for i in range(STEPS - 1)] == [False, True, False, True, True]
    assert any("up_blocks" in k for k in changed[0])  # dots alone: everywhere
    assert not any("up_blocks" in k for k in changed[3])  # ink alone, lbw=INALL: not the output blocks
    # weights restored, and the same "Lora hashes" in both infotexts (A1111's value: the addnet hash's first 12)
    _assert_same(_clone(hosts.pipe.unet), base_unet, "unet after the CLI image")
    want = {n: addnet_hash_safetensors(hosts.lora_dir / f"{n}.safetensors")[:12] for n in ("ink", "dots")}
    assert web_hashes == want
    assert f'Lora hashes: "{format_lora_hashes(want)}"' in parameters
    assert parameters.startswith(PROMPT + "\n")


SCHEDULE = "a cat <lora:ink:1:0@0,1@1> <lora:dots:0.5:unet=1@2,0@3>"


def test_cli_and_webui_paths_follow_the_same_schedule(hosts, tmp_path, monkeypatch):
    """Weight schedules use one step rule in both hosts: re-merged per step (the mode that writes weights, so they
    can be compared), the UNet weights at every step are the same on the CLI's and on A1111's tree."""
    init = LoraSession.__init__

    def merging(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.schedule_mode = "merge"

    monkeypatch.setattr(LoraSession, "__init__", merging)
    base_unet = _clone(hosts.pipe.unet)
    cli_steps, _, _ = _cli_weights(hosts, tmp_path, SCHEDULE)
    web_steps, _, _ = _webui_weights(hosts, monkeypatch, SCHEDULE)
    for i, (cli, web) in enumerate(zip(cli_steps, web_steps, strict=True)):
        _assert_same(cli, web, f"unet at step {i}")
    # ink ramps from 0 at step 0 to 1 at the last step; dots is 1 up to step 2, 0 from step 3: every step differs
    assert all(not all(torch.equal(a[k], b[k]) for k in base_unet) for a, b in zip(cli_steps, cli_steps[1:]))


def test_same_names_resolve_to_the_same_files(hosts, tmp_path):
    """Both hosts resolve with the catalogue's rules: alias (ss_output_name), sub/dir/name, unknown names."""
    from lora_ext.app.runner import lora_session

    sub = hosts.lora_dir / "styles"
    sub.mkdir(exist_ok=True)
    save_safetensors_atomic({"x.alpha": torch.tensor(1.0)}, sub / "ink.safetensors",
                            metadata={"ss_output_name": "Inky"})
    try:
        cli = lora_session([hosts.lora_dir]).resolver
        web = GlueState.create([hosts.lora_dir], None).session.resolver
        for name in ("ink", "styles/ink", "Inky", "/ink", "dots"):
            assert cli.resolve(name) == web.resolve(name), name
        assert Path(web.resolve("Inky")).parent.name == "styles"
        for resolver in (cli, web):
            with pytest.raises(FileNotFoundError, match=str(hosts.lora_dir)):
                resolver.resolve("nope")
    finally:
        (sub / "ink.safetensors").unlink()
