"""Textual-inversion vectors placed in the prompt (`lora_ext.patch.embeddings`), against diffusers' own textual
inversion loader (an independent reference: it adds tokens to the tokenizer and rows to the embedding table), and
bundled embeddings of LoRA files used by `generate` (the standalone host) as the WebUI uses them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_ext.errors import LoraExtError
from lora_ext.models.tiny import build_tiny_pipeline
from lora_ext.patch.embeddings import EmbeddingError, TokenInjector, attach_bundled, bundle_keys, pipeline_parts

ENCODE = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
PROMPTS = ["a red hrtz on the left", "hrtz", "a blue square, no token here"]


def _reference(arch: str, seed: int, vecs: list[torch.Tensor]):
    """A tiny pipeline with `vecs` loaded as the textual inversion "hrtz" by diffusers.

    SDXL's pooled output: diffusers gives the new tokens ids above the end token's, and CLIP configs with
    eos_token_id 2 pool at the largest id, i.e. at the name. A1111 (open_clip: argmax of the ids) keeps the name's own
    ids and pools at the end token, as we do; so the reference is told to pool at the end token (transformers' path
    for other eos ids), which is where the WebUI pools."""
    ref = build_tiny_pipeline(arch, seed=seed)
    ref.pools_at_end_token = False  # transformers < 4.31 always pools at the largest id: not adjustable
    for (_, tok, enc), vec in zip(pipeline_parts(ref), vecs):
        ref.load_textual_inversion(vec.clone(), token="hrtz", text_encoder=enc, tokenizer=tok)
        for m in enc.modules():
            if isinstance(getattr(m, "eos_token_id", None), int):
                m.eos_token_id = tok.eos_token_id
                ref.pools_at_end_token = True
    return ref


def _vectors(pipe, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, enc.get_input_embeddings().weight.shape[1], generator=g)
            for _, _, enc in pipeline_parts(pipe)]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("n", [1, 3])
def test_prompt_embeddings_equal_diffusers_textual_inversion(arch, n):
    ours = build_tiny_pipeline(arch, seed=1)
    vecs = _vectors(ours, n, seed=5)
    ref = _reference(arch, 1, vecs)
    injectors = [TokenInjector(tok, enc, {"hrtz": vec}) for (_, tok, enc), vec in zip(pipeline_parts(ours), vecs)]
    with torch.no_grad():
        want = ref.encode_prompt(PROMPTS, **ENCODE)
        got = ours.encode_prompt(PROMPTS, **ENCODE)
    for w, g in zip(want, got):
        if w is None:
            continue
        if w.ndim == 2 and not ref.pools_at_end_token:  # SDXL's pooled output: only the rows without the name
            w, g = w[2:], g[2:]
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    for inj in injectors:
        inj.remove()
    with torch.no_grad():  # detached: the prompt means what it meant before
        plain = build_tiny_pipeline(arch, seed=1).encode_prompt(PROMPTS, **ENCODE)
        after = ours.encode_prompt(PROMPTS, **ENCODE)
    assert torch.equal(plain[0], after[0])


def test_splice_places_vectors_and_keeps_end_token_and_length():
    pipe = build_tiny_pipeline("sd15", seed=0)
    tok, enc = pipe.tokenizer, pipe.text_encoder
    inj = TokenInjector(tok, enc, {"hrtz": torch.zeros(3, enc.get_input_embeddings().weight.shape[1]),
                                   "hrtzbig": torch.zeros(1, enc.get_input_embeddings().weight.shape[1])})
    ids = tok(["a hrtz and a hrtzbig", "word " * 80], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    new, slots = inj.splice(ids)
    assert new.shape == ids.shape
    row = new[0].tolist()
    a_id = tok(["a"], add_special_tokens=False).input_ids[0][0]
    assert row[0] == tok.bos_token_id and row[1] == a_id
    # "hrtz" -> 3 vectors at 2..4, then "and a", then "hrtzbig" (the longer name, not "hrtz" + "big") -> 1 vector
    assert [s for s in slots if s[0] == 0] == [(0, 2, "hrtz", 0), (0, 3, "hrtz", 1), (0, 4, "hrtz", 2),
                                                (0, 7, "hrtzbig", 0)]
    assert row[8] == tok.eos_token_id
    assert torch.equal(new[1], ids[1])  # a row without a name is untouched (truncated with its end token)
    inj.remove()


def test_wrong_width_and_bad_names_are_refused():
    pipe = build_tiny_pipeline("sd15", seed=0)
    with pytest.raises(EmbeddingError, match=r"needs \[n, "):
        TokenInjector(pipe.tokenizer, pipe.text_encoder, {"hrtz": torch.zeros(1, 7)})
    with pytest.raises(EmbeddingError, match="not usable as an embedding name"):
        attach_bundled(pipe, {"two words": {"string_to_param.*": torch.zeros(1, 7)}})
    xl = build_tiny_pipeline("sdxl", seed=0)
    with pytest.raises(EmbeddingError, match="made for another model family"):
        attach_bundled(xl, {"hrtz": {"string_to_param.*": torch.zeros(1, 32)}})
    assert issubclass(EmbeddingError, LoraExtError)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_generate_uses_the_bundled_embedding_like_diffusers_textual_inversion(arch, tmp_path):
    """A LoRA file that bundles `hrtz`: `<lora:file:1> a hrtz` through our standalone session gives the image diffusers
    gives with the same vectors loaded as a textual inversion (the file's LoRA modules are zero here, so only the
    embedding acts); without the tag the name is plain text again."""
    from lora_ext.app.runner import Session
    from lora_ext.models.sampling import generate_image

    vecs = _vectors(build_tiny_pipeline(arch, seed=2), 2, seed=9)
    ref = _reference(arch, 2, vecs)
    if arch == "sdxl" and not ref.pools_at_end_token:
        pytest.skip("transformers < 4.31 pools SDXL's prompt at diffusers' added token ids, so its image differs from "
                    "A1111's by design; the prompt-embedding test above covers this stack")
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    path, q = next((n, m) for n, m in build_tiny_pipeline(arch, seed=2).unet.named_modules()
                   if n.endswith("attn1.to_q"))
    module = "lora_unet_" + path.replace(".", "_")
    tensors = {**bundle_keys("hrtz", vecs), f"{module}.lora_down.weight": torch.zeros(1, q.in_features),
               f"{module}.lora_up.weight": torch.zeros(q.out_features, 1)}
    save_file(tensors, str(lora_dir / "withemb.safetensors"))
    session = Session(tmp_path / "unused", pipe=build_tiny_pipeline(arch, seed=2), arch=arch, lora_dirs=[lora_dir])
    kw = dict(seed=4, steps=3, width=64, height=64, cfg=5.0)
    got = session.generate("a red hrtz <lora:withemb:1>", **kw)
    assert got.warnings == []
    want = generate_image(ref, "a red hrtz", **kw)
    plain = session.generate("a red hrtz", **kw).image
    import numpy as np

    a, b, c = (np.asarray(x, dtype=np.int16) for x in (got.image, want, plain))
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - c).max() > 10  # the embedding changed the image
    assert session.generate("a red hrtz", **kw).image.tobytes() == plain.tobytes()  # removed after the image


def test_bundle_keys_layouts():
    assert list(bundle_keys("w", [torch.zeros(2, 4)])) == ["bundle_emb.w.string_to_param.*"]
    assert list(bundle_keys("w", [torch.zeros(2, 4), torch.zeros(2, 8)])) == ["bundle_emb.w.clip_l",
                                                                              "bundle_emb.w.clip_g"]
