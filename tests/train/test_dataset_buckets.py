"""Aspect-ratio buckets: the kohya bucket table, the choice rule, and invariants (hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ext.errors import DatasetError
from lora_ext.train.dataset import BucketParams, DatasetSpec, assign_bucket, make_buckets, plan_crop

# sd-scripts' bucket list for resolution 512, min 256, max 1024, steps 64 (printed by its make_buckets; each bucket's
# area <= 512^2 with the long side as large as the steps allow).
KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def test_bucket_table_matches_sd_scripts_for_512() -> None:
    assert make_buckets(512, 256, 1024, 64) == KOHYA_512


def _brute_force_table(res: int, lo: int, hi: int, step: int) -> set[tuple[int, int]]:
    """Independent construction: for each width the tallest admissible height, both orientations, plus the square."""
    area = res * res
    out = {(res // step * step, res // step * step)}
    for w in range(lo, hi + 1, step):
        heights = [h for h in range(lo, hi + 1, step) if w * h <= area]
        if heights:
            out |= {(w, max(heights)), (max(heights), w)}
    return out


@pytest.mark.parametrize(
    ("res", "lo", "hi", "step"), [(512, 256, 1024, 64), (1024, 512, 2048, 64), (768, 256, 1536, 32)]
)
def test_bucket_table_brute_force(res: int, lo: int, hi: int, step: int) -> None:
    assert set(make_buckets(res, lo, hi, step)) == _brute_force_table(res, lo, hi, step)


def test_known_assignments() -> None:
    up = BucketParams(512, 256, 1024, 64, no_upscale=False)
    # 3:2 landscape photo -> 576x384? not a bucket; the closest W/H to 1.5 is 640x384 (1.667) vs 576x448 (1.286)
    c = assign_bucket(1200, 800, up)
    assert c.bucket == (640, 384) and c.resized == (640, 427)
    # a square image smaller than the bucket is enlarged when upscaling is allowed...
    c = assign_bucket(300, 300, up)
    assert c.bucket == (512, 512) and c.resized == (512, 512) and c.upscaled
    # ...and gets its own bucket (rounded down to the step) without
    no_up = BucketParams(512, 256, 1024, 64, no_upscale=True)
    c = assign_bucket(300, 300, no_up)
    assert c.bucket == (256, 256) and c.own and not c.upscaled and c.resized == (256, 256)
    # large images use the predefined buckets in both modes
    assert assign_bucket(2000, 2000, no_up).bucket == (512, 512)
    assert assign_bucket(1200, 800, no_up).bucket == (640, 384)
    # an exact bucket size keeps its bucket
    assert assign_bucket(704, 320, up).bucket == (704, 320)
    # buckets disabled: one square bucket, scaled to cover
    off = BucketParams(512, 256, 1024, 64, enabled=False)
    c = assign_bucket(1000, 500, off)
    assert c.bucket == (512, 512) and c.resized == (1024, 512)


def test_tie_goes_to_first_bucket_in_sorted_order() -> None:
    # resolution 128 / step 64 / 64..256: buckets (64,192), (64,256), (128,128), (192,64), (256,64)
    params = BucketParams(128, 64, 256, 64, no_upscale=False)
    assert make_buckets(128, 64, 256, 64) == [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]
    # W/H = 2 is exactly 1 away from (128,128) and from (192,64): argmin picks the first, as sd-scripts
    assert assign_bucket(200, 100, params).bucket == (128, 128)


def test_spec_validation() -> None:
    with pytest.raises(DatasetError, match="bucket_reso_steps"):
        DatasetSpec(train_data_dir="x", resolution=512, bucket_reso_steps=60)
    with pytest.raises(DatasetError, match="min_bucket_reso"):
        DatasetSpec(train_data_dir="x", resolution=512, min_bucket_reso=200)
    with pytest.raises(DatasetError, match="^min_bucket_reso 576 is above resolution 512: lower --min_bucket_reso"):
        DatasetSpec(train_data_dir="x", resolution=512, min_bucket_reso=576)
    with pytest.raises(DatasetError, match="^max_bucket_reso 256 is below resolution 512: raise --max_bucket_reso"):
        DatasetSpec(train_data_dir="x", resolution=512, max_bucket_reso=256)
    spec = DatasetSpec(train_data_dir="x")
    with pytest.raises(DatasetError, match="resolution is not set"):
        spec.bucket_params()
    assert spec.resolved("sdxl").bucket_params() == BucketParams(1024, 256, 2048, 64, True, True)
    assert spec.resolved("sd2", v_prediction=True).resolution == 768
    assert spec.resolved("sd1").resolution == 512


@pytest.mark.parametrize(("resolution", "steps", "limits"), [
    (64, 64, (64, 128)), (128, 64, (64, 256)), (256, 64, (128, 512)), (512, 64, (256, 1024)),
    (768, 64, (256, 1536)), (1024, 64, (256, 2048)), (64, 8, (32, 128)), (200, 8, (96, 400)),
])
def test_unset_bucket_limits_follow_the_resolution(resolution, steps, limits) -> None:
    """min = resolution / 2, at most 256 (kohya's default at 512 px), on the step grid; max = 2 x resolution. Any
    resolution alone is accepted (`--resolution 64` used to fail on a min_bucket_reso of 256 the user never set)."""
    p = DatasetSpec(train_data_dir="x", resolution=resolution, bucket_reso_steps=steps).bucket_params()
    assert (p.min_reso, p.max_reso) == limits
    assert p.min_reso <= resolution <= p.max_reso and p.min_reso % steps == 0


@st.composite
def _params(draw: st.DrawFn) -> BucketParams:
    step = draw(st.sampled_from([8, 16, 32, 64]))
    res = draw(st.integers(max(4, 64 // step), 2048 // step)) * step
    lo = draw(st.integers(1, res // step)) * step
    hi = draw(st.integers(res // step, 2 * res // step)) * step
    return BucketParams(res, lo, hi, step, no_upscale=draw(st.booleans()))


_side = st.integers(1, 6000)


@settings(max_examples=300, deadline=None)
@given(params=_params(), w=_side, h=_side)
def test_bucket_invariants(params: BucketParams, w: int, h: int) -> None:
    c = assign_bucket(w, h, params)
    bw, bh = c.bucket
    step = params.step
    assert bw > 0 and bh > 0 and bw % step == 0 and bh % step == 0
    assert bw * bh <= params.max_area
    assert bw <= params.max_reso and bh <= params.max_reso
    rw, rh = c.resized
    # the scaled image covers the bucket and keeps the aspect ratio (up to rounding to whole pixels)
    assert rw >= bw and rh >= bh
    s = max(bw / w, bh / h)
    assert abs(rw - w * s) <= 0.5 + 1e-9 or rw == bw
    assert abs(rh - h * s) <= 0.5 + 1e-9 or rh == bh
    table = make_buckets(params.resolution, params.min_reso, params.max_reso, step)
    if c.own:
        # own bucket: no enlargement, fits inside the image, only when the nearest bucket would need upscaling
        assert params.no_upscale and not c.upscaled
        assert bw <= w and bh <= h and rw <= w and rh <= h
    else:
        assert c.bucket in table
        assert min(bw, bh) >= params.min_reso
        if params.no_upscale and not c.upscaled:
            assert rw <= w and rh <= h
        ar = w / h
        if (w, h) != c.bucket:
            best = min(abs(a / b - ar) for a, b in table)
            assert abs(bw / bh - ar) <= best + 1e-12
    if params.no_upscale and c.upscaled:
        # only when even an own bucket is impossible (a side would round to 0)
        f = min(1.0, math.sqrt(params.max_area / (w * h)), params.max_reso / w, params.max_reso / h)
        assert int(w * f) < step or int(h * f) < step


@settings(max_examples=200, deadline=None)
@given(
    params=_params(),
    w=st.integers(8, 4000),
    h=st.integers(8, 4000),
    zoom=st.floats(1.0, 3.0),
    fx=st.floats(0.0, 1.0),
    fy=st.floats(0.0, 1.0),
)
def test_crop_window_inside_image(params: BucketParams, w: int, h: int, zoom: float, fx: float, fy: float) -> None:
    c = assign_bucket(w, h, params)
    plan = plan_crop((w, h), c.bucket, zoom=zoom, fx=fx, fy=fy, no_upscale=params.no_upscale)
    left, top, right, bottom = plan.box
    eps = 1e-6 * max(w, h)
    assert -eps <= left and -eps <= top and right <= w + eps and bottom <= h + eps
    # the window scaled by `scale` is exactly the bucket
    assert math.isclose((right - left) * plan.scale, c.bucket[0], rel_tol=1e-9)
    assert math.isclose((bottom - top) * plan.scale, c.bucket[1], rel_tol=1e-9)
    if params.no_upscale and not c.upscaled:
        assert plan.scale <= 1.0 + 1e-12  # zoom never enlarges source pixels with bucket_no_upscale
