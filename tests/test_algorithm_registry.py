"""Every table outside `lora_ext.formats.algorithms` is built from the registry `ALGORITHMS`.

Each registered algorithm class declares its key suffixes, anchor keys, bias key, whether it reads the current weight,
whether alpha applies, and how to synthesize test tensors (docs/adding-an-algorithm.md). These tests run once per
registered class, so a class added to the registry is checked automatically, and a derived table that misses it (key
splitting, the catalogue's algorithm column, synthetic files, the patcher's bias and sequential rules) fails here.
Declared facts are checked against the class's own behaviour, not only against each other.
"""

from __future__ import annotations

import pytest
import torch

from lora_ext.formats.algorithms import ALGORITHMS, LayerSpec, algorithm_named, detect_algorithm
from lora_ext.formats.algorithms.base import COMMON_KEYS, COMMON_SUFFIXES
from lora_ext.formats.keys import GUARDED_SUFFIXES, PLAIN_SUFFIXES, SUFFIXES, SplitKey, split_key
from lora_ext.formats.network import parse_lora
from lora_ext.formats.safetensors_io import save_safetensors_atomic
from lora_ext.library import LoraIndex
from lora_ext.patch import ActiveLora, Patcher, adapter_for_pipeline
from lora_ext.patch.synth import SynthSpec, make_lora_tensors

IDS = [cls.name for cls in ALGORITHMS]
LAYERS = {
    "linear": LayerSpec("linear", (12, 8)),
    "conv": LayerSpec("conv", (12, 8, 3, 3)),
    "norm": LayerSpec("norm", (12,)),
}
MODULE = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _rnd(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g) * 0.1


def _synth(cls, kind: str, with_bias: bool = True, seed: int = 0) -> dict[str, torch.Tensor] | None:
    return cls.synthesize(LAYERS[kind], 4, _rnd(seed), with_bias)


def _kinds(cls) -> list[str]:
    kinds = [k for k in LAYERS if _synth(cls, k) is not None]
    assert kinds, f"{cls.name}.synthesize makes tensors for none of {list(LAYERS)}"
    return kinds


@pytest.fixture(scope="module")
def sd15():
    from lora_ext.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd15", seed=0)


def _select(target) -> bool:
    """The tiny SD1.5's text encoder (linear + norm layers) and one resnet (3x3 convs)."""
    return target.component == "te1" or ".down_blocks.0.resnets.0." in f".{target.key.split(':', 1)[1]}"


# ------------------------------------------------------------------------------------------------- the declarations


def test_names_are_unique_and_resolve():
    assert len(set(IDS)) == len(IDS)
    for cls in ALGORITHMS:
        assert algorithm_named(cls.name) is cls
    with pytest.raises(ValueError, match="known: lora"):
        algorithm_named("no-such-algorithm")


@pytest.mark.parametrize("cls", ALGORITHMS, ids=IDS)
def test_declared_keys_are_the_keys_the_class_reads(cls):
    own = set(cls.suffixes.values()) | set(cls.guarded_suffixes.values())
    assert set(cls.anchors) <= own and cls.anchors
    assert cls.bias_key is None or cls.bias_key in own
    for kind in _kinds(cls):
        tensors = _synth(cls, kind)
        assert set(tensors) <= own, f"{cls.name} synthesizes keys it does not declare: {set(tensors) - own}"
        algorithm = detect_algorithm(tensors)
        assert type(algorithm) is cls, f"{cls.name}'s own tensors are detected as {type(algorithm).__name__}"
        assert algorithm.used_keys == frozenset(tensors)
        assert sum(k in tensors for k in cls.anchors) == 1  # an anchor counts one module
        algorithm.check_shape(LAYERS[kind])


@pytest.mark.parametrize("cls", ALGORITHMS, ids=IDS)
def test_declared_facts_match_the_math(cls):
    """bias_key, reads_current_weight and uses_alpha say what weight_delta / bias_delta / scale actually do."""
    kind = _kinds(cls)[0]
    spec = LAYERS[kind]
    tensors = _synth(cls, kind, with_bias=True)
    algorithm = detect_algorithm(tensors)
    assert (algorithm.bias_delta(None, spec) is not None) == (cls.bias_key is not None) == algorithm.has_bias_delta
    w = torch.randn(spec.weight_shape, generator=torch.Generator().manual_seed(3))
    d1 = algorithm.weight_delta(w, spec).materialize(spec.weight_shape)
    d2 = algorithm.weight_delta(2 * w, spec).materialize(spec.weight_shape)
    assert torch.equal(d1, d2) != cls.reads_current_weight
    assert algorithm.needs_current_weight == cls.reads_current_weight
    with_alpha = detect_algorithm({**tensors, "alpha": torch.tensor(0.5)})
    assert (with_alpha.scale() != algorithm.scale()) == cls.uses_alpha


@pytest.mark.parametrize("cls", ALGORITHMS, ids=IDS)
def test_input_width_is_the_layer_input_or_unknown(cls):
    """What architecture detection reads (the width cross-attention's to_k/to_v and the text encoder read)."""
    for kind in _kinds(cls):
        if kind == "norm":
            continue
        shapes = {k: tuple(t.shape) for k, t in _synth(cls, kind).items()}
        spec = LAYERS[kind]  # a conv factor stored flattened (r, in*kh*kw) gives in*kh*kw
        assert cls.input_width(shapes) in (None, spec.weight_shape[1], spec.in_flat)


# ----------------------------------------------------------------------------------------------- the derived tables


@pytest.mark.parametrize("cls", ALGORITHMS, ids=IDS)
def test_key_splitting_knows_every_declared_suffix(cls):
    assert cls.suffixes.items() <= SUFFIXES.items()
    assert cls.guarded_suffixes.items() <= GUARDED_SUFFIXES.items()
    for file_suffix, suffix in {**cls.suffixes, **cls.guarded_suffixes}.items():
        assert split_key(MODULE + file_suffix) == SplitKey(MODULE, suffix), file_suffix
        if file_suffix == f".{suffix}" and file_suffix not in cls.guarded_suffixes:
            assert suffix in PLAIN_SUFFIXES


def test_common_suffixes_split_and_no_two_declarations_disagree():
    for file_suffix, suffix in COMMON_SUFFIXES.items():
        assert split_key(MODULE + file_suffix) == SplitKey(MODULE, suffix)
    assert set(COMMON_SUFFIXES.values()) == COMMON_KEYS
    seen: dict[str, tuple[str, str]] = {}
    for cls in ALGORITHMS:
        for file_suffix, suffix in cls.suffixes.items():
            assert file_suffix not in COMMON_SUFFIXES, f"{cls.name} redeclares the common {file_suffix}"
            other = seen.setdefault(file_suffix, (cls.name, suffix))
            assert other == (cls.name, suffix), f"{file_suffix}: {other} and {(cls.name, suffix)}"


@pytest.mark.parametrize("cls", ALGORITHMS, ids=IDS)
def test_synthetic_file_parses_lists_and_patches_as_its_algorithm(cls, sd15, tmp_path):
    """One synthetic file per algorithm through every consumer: parse, the catalogue, the patcher (bias and the
    sequential rule for algorithms that read the current weight), restore."""
    adapter = adapter_for_pipeline(sd15)
    tensors = make_lora_tensors(adapter, SynthSpec(cls.name, rank=2, std=0.1), _select, seed=5,
                                components=("unet", "te1"))
    assert tensors, f"make_lora_tensors made nothing for {cls.name}"
    net = parse_lora(tensors, name=cls.name)
    assert net.unknown_keys == [] and {type(m.algorithm) for m in net.modules.values()} == {cls}

    (tmp_path / "Lora").mkdir()
    path = save_safetensors_atomic(tensors, tmp_path / "Lora" / f"{cls.name}.safetensors")
    (entry,) = LoraIndex([tmp_path / "Lora"]).refresh()
    assert entry.path == path and entry.problems == ()
    assert (entry.algorithm, entry.n_modules) == (cls.name, len(net.modules))

    params = {k: p for k, p in [*sd15.unet.named_parameters(), *sd15.text_encoder.named_parameters()]}
    original = {k: p.detach().clone() for k, p in params.items()}
    patcher = Patcher(adapter)
    # the same file twice: an algorithm that reads the current weight sees the first copy's result
    patcher.apply([ActiveLora(net), ActiveLora(net)])
    try:
        expected_changes = 0
        for mname, module in net.modules.items():
            target = adapter.lookup(mname)
            owner_prefix = "unet" if target.component == "unet" else "text_encoder"
            w_name = _param_name(sd15, owner_prefix, target.module, target.weight_attr)
            w0 = original[w_name].float()
            spec = target.spec
            once = w0 + module.algorithm.weight_delta(w0, spec).materialize(spec.weight_shape)
            want = once + module.algorithm.weight_delta(once, spec).materialize(spec.weight_shape)
            torch.testing.assert_close(params[w_name].detach().float(), want, rtol=2e-5, atol=2e-6)
            expected_changes += 1
            if cls.bias_key is not None and target.bias_attr is not None:
                b_name = _param_name(sd15, owner_prefix, target.module, target.bias_attr)
                db = module.algorithm.bias_delta(original[b_name], spec)
                torch.testing.assert_close(params[b_name].detach(), original[b_name] + 2 * db)
                assert not torch.equal(params[b_name].detach(), original[b_name])
        assert expected_changes == len(net.modules)
    finally:
        patcher.restore()
    assert all(torch.equal(params[k].detach(), original[k]) for k in params)


def _param_name(pipe, owner_prefix: str, module: torch.nn.Module, attr: str) -> str:
    root = pipe.unet if owner_prefix == "unet" else pipe.text_encoder
    for name, m in root.named_modules():
        if m is module:
            return f"{name}.{attr}" if name else attr
    raise AssertionError("target module not found in the pipeline")


def test_reads_current_weight_makes_the_patcher_sequential():
    """Non-triviality of the sequential check above: for an algorithm that reads the weight, applying twice in
    sequence differs from adding its delta twice."""
    for cls in ALGORITHMS:
        if not cls.reads_current_weight:
            continue
        kind = _kinds(cls)[0]
        spec = LAYERS[kind]
        algorithm = detect_algorithm(_synth(cls, kind))
        w0 = torch.randn(spec.weight_shape, generator=torch.Generator().manual_seed(4))
        once = w0 + algorithm.weight_delta(w0, spec).materialize(spec.weight_shape)
        sequential = once + algorithm.weight_delta(once, spec).materialize(spec.weight_shape)
        summed = w0 + 2 * algorithm.weight_delta(w0, spec).materialize(spec.weight_shape)
        assert not torch.allclose(sequential, summed)
