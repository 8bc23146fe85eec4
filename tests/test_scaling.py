import json
import math
import re

import pytest

from effnet_jax.errors import UserError
from effnet_jax.model import scaling
from effnet_jax.model.arch import B0
from effnet_jax.model.scaling import (
    OFFICIAL,
    build_architecture,
    from_constants,
    load_constants,
    round_filters,
    round_repeats,
)


@pytest.mark.parametrize(
    "filters, width, expected",
    [
        (32, 1.0, 32),
        (16, 1.1, 16),  # 17.6 -> 16, within 10%
        (32, 1.4, 48),  # 44.8 -> 48 (B4 stem)
        (32, 2.0, 64),  # B7 stem
        (1280, 2.0, 2560),  # B7 head
        (1280, 1.1, 1408),  # B2 head
        (40, 1.2, 48),
        (3, 1.0, 8),  # never below the divisor
        (7, 1.7, 16),  # 11.9 rounds to 8, lost > 10% -> bumped by 8
        (13, 1.0, 16),
        (12, 1.0, 16),  # ties round up
    ],
)
def test_round_filters(filters, width, expected):
    assert round_filters(filters, width) == expected


def test_round_filters_ten_percent_bump_is_what_changes_the_result():
    scaled = 7 * 1.7
    plain = max(8, int(scaled + 4) // 8 * 8)
    assert plain < 0.9 * scaled  # without the bump it would be 8
    assert round_filters(7, 1.7) == plain + 8


@pytest.mark.parametrize("repeats, depth, expected", [(1, 1.0, 1), (3, 1.1, 4), (2, 1.2, 3), (4, 3.1, 13), (1, 3.6, 4)])
def test_round_repeats(repeats, depth, expected):
    assert round_repeats(repeats, depth) == expected


def test_official_table():
    expected = {
        "b0": (1.0, 1.0, 224, 0.2), "b1": (1.0, 1.1, 240, 0.2), "b2": (1.1, 1.2, 260, 0.3),
        "b3": (1.2, 1.4, 300, 0.3), "b4": (1.4, 1.8, 380, 0.4), "b5": (1.6, 2.2, 456, 0.4),
        "b6": (1.8, 2.6, 528, 0.5), "b7": (2.0, 3.1, 600, 0.5), "b8": (2.2, 3.6, 672, 0.5),
        "l2": (4.3, 5.3, 800, 0.5),
    }
    assert set(OFFICIAL) == set(expected)
    for name, (w, d, r, p) in expected.items():
        s = OFFICIAL[name]
        assert (s.width, s.depth, s.resolution, s.dropout) == (w, d, r, p)


def test_b0_architecture_matches_table():
    arch = build_architecture("b0")
    assert len(arch.blocks) == 16
    assert arch.stem_channels == 32 and arch.head_channels == 1280
    assert [b.out_channels for b in arch.blocks] == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112,
                                                     192, 192, 192, 192, 320]
    assert [b.stride for b in arch.blocks].count(2) == 4
    assert arch.total_stride == 32
    assert arch.blocks[1].se_channels == 4  # 0.25 of the block's input (16), not of 96
    assert arch.blocks[0].drop_path == 0.0
    assert arch.blocks[-1].drop_path == pytest.approx(0.2 * 15 / 16)


def test_repeats_per_stage_for_b7():
    arch = build_architecture("b7")
    per_stage = [sum(b.stage == i for b in arch.blocks) for i in range(len(B0.stages))]
    assert per_stage == [math.ceil(3.1 * s.repeats) for s in B0.stages]


def test_formula_mode():
    s = from_constants(1.2, 1.1, 1.15, phi=1)
    assert (s.width, s.depth) == pytest.approx((1.1, 1.2))
    assert s.resolution == 256  # 224 * 1.15 = 257.6 -> nearest multiple of 8
    s2 = from_constants(1.2, 1.1, 1.15, phi=2)
    assert (s2.width, s2.depth) == pytest.approx((1.21, 1.44))
    assert s2.resolution % 8 == 0 and abs(s2.resolution - 224 * 1.15**2) <= 4
    assert from_constants(1.2, 1.1, 1.15, phi=0).resolution == 224
    small = from_constants(1.0, 1.0, 1.15, phi=1, base_resolution=32, resolution_multiple=1)
    assert small.resolution == 37
    assert from_constants(1.2, 1.1, 1.15, phi=4).dropout == pytest.approx(0.4)


@pytest.mark.parametrize("bad", [dict(alpha=0.9, beta=1.1, gamma=1.1), dict(alpha=1.2, beta=float("nan"), gamma=1.1)])
def test_formula_rejects_bad_constants(bad):
    with pytest.raises(UserError):
        from_constants(**bad, phi=1)


def test_formula_rejects_negative_phi():
    with pytest.raises(UserError, match="phi"):
        from_constants(1.2, 1.1, 1.15, phi=-1)


@pytest.mark.parametrize("phi, what", [(1e5, "depth multiplier 1.2"), (1e6, "width multiplier 1.1"),
                                       (38, "depth multiplier"), (30, "resolution 224 \\* 1.15\\*\\*30")])
def test_formula_refuses_a_phi_that_would_overflow(phi, what):
    """alpha**1e6 is an OverflowError in Python: a typo in phi must name phi instead."""
    with pytest.raises(UserError, match=re.escape(f"phi {phi:g} is too large: ") + f".*{what}.* would exceed"):
        from_constants(1.2, 1.1, 1.15, phi=phi)
    big = from_constants(1.2, 1.1, 1.15, phi=20)  # huge, but a spec someone may want to count
    assert big.resolution < scaling.MAX_RESOLUTION and big.depth < scaling.MAX_MULTIPLIER


def test_load_constants(tmp_path):
    p = tmp_path / "best.json"
    p.write_text(json.dumps({"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "val_top1": 0.9}))
    assert load_constants(p) == {"alpha": 1.2, "beta": 1.1, "gamma": 1.15}


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"alpha": 0.9, "beta": 1.1, "gamma": 1.15}', "alpha must be a finite number >= 1"),
        ('{"alpha": 1.2, "beta": NaN, "gamma": 1.15}', "beta must be a finite number >= 1"),
        ('{"alpha": 1.2, "beta": 1.1, "gamma": Infinity}', "gamma must be a finite number >= 1"),
        ('{"alpha": 1.2, "beta": 1.1}', "lack 'gamma'"),
        ('{"alpha": "1.2", "beta": 1.1, "gamma": 1.1}', "alpha must be a number"),
        ('{"alpha": true, "beta": 1.1, "gamma": 1.1}', "alpha must be a number"),
        ("[1.2, 1.1, 1.15]", "JSON object"),
        ("{not json", "cannot read"),
    ],
)
def test_load_constants_errors(tmp_path, content, message):
    p = tmp_path / "best.json"
    p.write_text(content)
    with pytest.raises(UserError, match=message):
        load_constants(p)


def test_load_constants_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_constants(tmp_path / "nope.json")


def test_resolve():
    assert scaling.resolve("B3") is OFFICIAL["b3"]
    assert scaling.resolve("efficientnet-b3") is OFFICIAL["b3"]
    spec = from_constants(1.2, 1.1, 1.15, phi=1)
    assert scaling.resolve(spec) is spec
    with pytest.raises(UserError, match="unknown model"):
        scaling.resolve("b9")
