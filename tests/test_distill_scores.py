"""Adaptive-length CoT scores: image clarity, question heuristics, min-max normalisation, DRLC (rl/distill.py)."""

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from skyjax.rl.distill import (
    ClarityConfig,
    DRLCConfig,
    HeuristicJudge,
    QueryJudge,
    dataset_penalties,
    drlc_penalty,
    image_clarity,
    integration_score,
    laplacian_variance,
    minmax_normalise,
    resolution_score,
    sharpness_score,
    text_score,
    to_grayscale,
)


@pytest.fixture(scope="module")
def chart_image():
    """A 1024 x 768 'document' image: boxes, lines and labels on white, deterministic."""
    rng = np.random.default_rng(0)
    im = Image.new("RGB", (1024, 768), "white")
    draw = ImageDraw.Draw(im)
    for k in range(60):
        x, y = (int(v) for v in rng.integers(0, 1000, 2))
        w, h = (int(v) for v in rng.integers(10, 200, 2))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rectangle([x, y, x + w, y + h], outline=color, width=2)
        draw.line([x, y, x + h, y + w], fill=color, width=1)
        draw.text((int(rng.integers(0, 980)), int(rng.integers(0, 750))), f"Label {k}", fill=(0, 0, 0))
    return im


# ---------------------------------------------------------------------------------------------------------- image


def test_laplacian_variance_of_a_checkerboard():
    # every interior pixel's 4 neighbours hold the other colour: the Laplacian is +-4*255 in equal numbers,
    # so its variance is (4 * 255)^2
    board = (np.indices((10, 12)).sum(axis=0) % 2) * 255
    assert laplacian_variance(board) == pytest.approx((4 * 255) ** 2, rel=1e-12)
    assert laplacian_variance(np.full((50, 50), 128.0)) == 0.0
    assert laplacian_variance(np.zeros((2, 50))) == 0.0  # too small for a 3 x 3 stencil
    # a linear ramp has zero second derivative
    assert laplacian_variance(np.add.outer(np.arange(20.0), 2 * np.arange(30.0))) == pytest.approx(0.0, abs=1e-18)


def test_grayscale_inputs_agree(chart_image, tmp_path):
    from_pil = to_grayscale(chart_image)
    rgb = np.asarray(chart_image)
    expected = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    np.testing.assert_allclose(from_pil, expected, rtol=1e-12)
    np.testing.assert_allclose(to_grayscale(rgb.astype(np.float32) / 255.0), expected, rtol=1e-5, atol=1e-3)
    path = tmp_path / "chart.png"
    chart_image.save(path)
    np.testing.assert_allclose(to_grayscale(path), expected, rtol=1e-12)
    np.testing.assert_allclose(to_grayscale(chart_image.convert("RGBA")), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="channels"):
        to_grayscale(np.zeros((4, 4, 2)))


def test_score_curves():
    assert sharpness_score(0.0) == 0.0
    assert sharpness_score(100.0, scale=100.0) == 0.5
    assert sharpness_score(300.0, scale=100.0) == 0.75
    assert resolution_score(224, 224) == 0.0
    assert resolution_score(10, 10) == 0.0  # clipped below
    assert resolution_score(448 * 12, 448) == pytest.approx(1.0)
    assert resolution_score(8000, 8000) == 1.0  # clipped above
    # log scale: the geometric mean of min and max pixels sits in the middle
    assert resolution_score(1, 100, min_pixels=10, max_pixels=1000) == pytest.approx(0.5)


def test_blurred_copy_scores_lower(chart_image):
    scores = [image_clarity(chart_image.filter(ImageFilter.GaussianBlur(r)) if r else chart_image)
              for r in (0, 1, 2, 4)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.NEAREST])
def test_low_resolution_copy_scores_lower(chart_image, resample):
    small = chart_image.resize((256, 192), resample)
    assert image_clarity(small) < image_clarity(chart_image)


def test_resolution_term_ranks_a_hard_edged_small_copy_lower(chart_image):
    # nearest-neighbour shrinking keeps edges hard and packs them closer: by sharpness alone the small copy looks
    # sharper; the resolution term is what ranks it lower
    small = chart_image.resize((256, 192), Image.Resampling.NEAREST)
    sharp_only = ClarityConfig(sharpness_weight=1.0, resolution_weight=0.0)
    assert image_clarity(small, sharp_only) > image_clarity(chart_image, sharp_only)
    assert image_clarity(small) < image_clarity(chart_image)


def test_clarity_combination(chart_image):
    cfg = ClarityConfig(sharpness_scale=50.0, sharpness_weight=3.0, resolution_weight=1.0)
    gray = to_grayscale(chart_image)
    v = laplacian_variance(gray)
    expected = (3.0 * v / (v + 50.0) + 1.0 * resolution_score(768, 1024)) / 4.0
    assert image_clarity(chart_image, cfg) == pytest.approx(expected, rel=1e-12)
    assert image_clarity(np.full((2000, 2000), 200, dtype=np.uint8)) == pytest.approx(
        0.5 * resolution_score(2000, 2000))  # flat: no sharpness at all
    with pytest.raises(ValueError, match="min_pixels < max_pixels"):
        ClarityConfig(min_pixels=100, max_pixels=100)
    with pytest.raises(ValueError, match="not both 0"):
        ClarityConfig(sharpness_weight=0.0, resolution_weight=0.0)


# -------------------------------------------------------------------------------------------------- normalisation


def test_minmax_normalise():
    np.testing.assert_allclose(minmax_normalise([2.0, 4.0, 6.0, 3.0]), [0.0, 0.5, 1.0, 0.25])
    np.testing.assert_array_equal(minmax_normalise([7.0, 7.0]), [0.5, 0.5])
    np.testing.assert_array_equal(minmax_normalise([7.0, 7.0], constant=0.0), [0.0, 0.0])
    cols = minmax_normalise(np.array([[1.0, 5.0, -1.0], [3.0, 5.0, 1.0], [2.0, 5.0, 0.0]]))
    np.testing.assert_allclose(cols, [[0.0, 0.5, 0.0], [1.0, 0.5, 1.0], [0.5, 0.5, 0.5]])
    assert minmax_normalise([]).shape == (0,)
    with pytest.raises(ValueError, match=r"index \(1,\) is nan"):
        minmax_normalise([1.0, float("nan"), 2.0])


# ----------------------------------------------------------------------------------------------------------- DRLC


def test_drlc_on_hand_computed_scores():
    # (0.5 + 0.5*0.2 + 2*0.9) / (1 + 0.5 + 2) = 2.4 / 3.5 = 24/35; exponent 2 * (1 - 24/35) = 22/35
    assert drlc_penalty(0.5, 0.2, 0.9, alpha=2.0, beta=0.5, gamma=2.0) == pytest.approx(math.exp(22 / 35), rel=1e-14)
    # defaults alpha = ln 2, beta = gamma = 1: P = 2 ** (1 - mean)
    assert drlc_penalty(0.0, 0.0, 0.0) == pytest.approx(2.0)
    assert drlc_penalty(1.0, 1.0, 1.0) == pytest.approx(1.0)
    assert drlc_penalty(0.5, 0.5, 0.5) == pytest.approx(math.sqrt(2.0))
    assert drlc_penalty(1.0, 0.0, 0.5) == pytest.approx(2.0 ** 0.5)
    # the cap binds when alpha > ln 2: exp(3 * (1 - 0.1)) = 14.9 -> 2
    assert drlc_penalty(0.1, 0.1, 0.1, alpha=3.0) == 2.0
    assert drlc_penalty(0.9, 0.9, 0.9, alpha=3.0) == pytest.approx(math.exp(0.3))
    # alpha = 0: no penalty at all
    assert drlc_penalty(0.0, 0.3, 1.0, alpha=0.0) == 1.0


def test_drlc_is_monotone_and_broadcasts():
    s = np.linspace(0.0, 1.0, 11)
    p = drlc_penalty(s, 0.5, s, alpha=1.5)
    assert p.shape == (11,) and np.all(np.diff(p) <= 0) and p[0] <= 2.0 and p[-1] >= 1.0
    assert isinstance(drlc_penalty(0.2, 0.3, 0.4), float)


@pytest.mark.parametrize("kwargs,message", [
    ({"s_v": 1.2}, "s_v must be normalised"),
    ({"s_t": -0.1}, "s_t must be normalised"),
    ({"s_i": float("nan")}, "s_i must be normalised"),
    ({"alpha": -1.0}, "alpha must be >= 0"),
    ({"gamma": -1.0}, "beta and gamma must be >= 0"),
    ({"cap": 0.5}, "cap must be >= 1"),
])
def test_drlc_rejects_bad_inputs(kwargs, message):
    args = {"s_v": 0.5, "s_t": 0.5, "s_i": 0.5} | kwargs
    with pytest.raises(ValueError, match=message):
        drlc_penalty(**args)


def test_dataset_penalties():
    # normalised: s_v [0, .5, 1], s_t [0, 0, 1], s_i [0, 1, .5]; means [0, 1/2, 5/6]; P = 2 ** (1 - mean)
    got = dataset_penalties([0.1, 0.5, 0.9], [0.2, 0.2, 0.8], [0.0, 1.0, 0.5])
    np.testing.assert_allclose(got, [2.0, 2.0 ** 0.5, 2.0 ** (1 / 6)], rtol=1e-14)
    # a constant column sits at 0.5: here every score is constant, so every row gets 2 ** 0.5
    np.testing.assert_allclose(dataset_penalties([3, 3], [1, 1], [0, 0]), [2.0 ** 0.5] * 2)
    cfg = DRLCConfig(alpha=2.0, beta=0.5, gamma=2.0)
    got = dataset_penalties([0.0, 1.0], [0.0, 1.0], [0.0, 1.0], cfg)
    np.testing.assert_allclose(got, [2.0, 1.0])


# ---------------------------------------------------------------------------------------------- question heuristics


LOOKUPS = ["What color is the car?", "Where is the cat?", "What is the name of the building?",
           "Which animal is shown?", "How many apples are there?"]
CAUSAL = ["Why does the block on the incline in the figure accelerate even though friction acts on it?",
          "How does the current through the resistor change when the switch in the circuit is closed?",
          "Explain what causes the shadow of the tree to point to the left of the house in the image."]


def test_integration_ranks_causal_above_lookups():
    low = [integration_score(q) for q in LOOKUPS]
    high = [integration_score(q) for q in CAUSAL]
    assert max(low) < min(high)
    assert all(s == 0.0 for s in low)


def test_integration_spatial_and_domain_terms():
    plain = integration_score("Is there a ball in the picture?")
    spatial = integration_score("Is the red ball to the left of the blue box and between the two cones?")
    assert spatial > plain
    one_term = integration_score("Describe the triangle.")
    co_occurring = integration_score("Describe the triangle: its angle, its hypotenuse and the circle's radius.")
    assert co_occurring > one_term


def test_text_score_ranks_demanding_questions_higher():
    hard = ("Given the circuit shown with R1 = 4 ohm and R2 = 6 ohm in parallel, if the source is 12 V, "
            "calculate the total current and determine the power dissipated in each resistor.")
    assert text_score(hard) > text_score("What color is the car?") > text_score("Color?")
    assert text_score("Color?") == 0.0
    # "how many" is a count, not reasoning
    assert text_score("How many apples are there?") < text_score("How does the apple fall from there?")


def test_scores_stay_in_range():
    rng = np.random.default_rng(1)
    vocab = ("why how what where the a force angle left of between figure if then 3 = + \\frac image each "
             "because triangle circle price demand and is there shown above below explain").split()
    for _ in range(200):
        q = " ".join(rng.choice(vocab, size=int(rng.integers(0, 60))))
        assert 0.0 <= text_score(q) <= 1.0
        assert 0.0 <= integration_score(q) <= 1.0


def test_heuristic_judge(chart_image):
    judge: QueryJudge = HeuristicJudge()
    assert judge.vision_score(chart_image, "q") == image_clarity(chart_image)
    assert judge.vision_score(None, "q") == 0.0
    assert judge.text_score(CAUSAL[0]) == text_score(CAUSAL[0])
    assert judge.integration_score(None, CAUSAL[0]) == integration_score(CAUSAL[0])
