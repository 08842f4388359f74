"""The demo task metric on the synthetic dataset's own clips (ground truth from ClipSpec): direction and speed of
every one of 40 seeded clips, with and without noise, colour shifts and a distractor; wrap-around; absent colours,
still shapes, captions that leave attributes out, the aggregate rate, and the error paths."""

import numpy as np
import pytest

from accel.demo.track import TrackConfig, colour_mask, motion_match_rate, parse_caption, summarize, track
from accel.lora.synthetic import COLOURS, ClipSpec, clip_spec, render_clip

CLIPS = [clip_spec(0, i) for i in range(40)]


def _video(spec: ClipSpec, frames: int = 17, size: int = 64) -> np.ndarray:
    return render_clip(spec, frames, size, size)


def test_recovers_direction_and_speed_of_every_clip():
    results = [track(_video(s), s.caption) for s in CLIPS]
    for s, r in zip(CLIPS, results, strict=True):
        assert r.direction == s.direction, (s, r.velocity)
        assert r.speed_class == s.speed, (s, r.speed)
        assert r.matches
    rate = summarize(results)
    print(rate.summary())  # 40 clips: direction 100%, speed 100%
    assert rate.match_rate == rate.direction_rate == rate.speed_rate == rate.colour_rate == 1.0
    assert {s.direction for s in CLIPS} == {"left", "right", "up", "down"}
    assert {s.speed for s in CLIPS} == {"slow", "fast"}


def test_fitted_speed_is_the_dataset_speed():
    from accel.lora.synthetic import SPEEDS

    for s in CLIPS[:12]:
        r = track(_video(s, size=96), s.caption)
        assert abs(r.speed - SPEEDS[s.speed]) < 0.25 * SPEEDS[s.speed], (s, r.speed)


@pytest.mark.parametrize("sigma", [10.0, 30.0])
def test_robust_to_pixel_noise(sigma):
    rng = np.random.default_rng(1)
    pairs = []
    for s in CLIPS:
        v = _video(s).astype(np.float32) + rng.normal(0, sigma, (17, 64, 64, 3))
        pairs.append((np.clip(v, 0, 255).astype(np.uint8), s.caption))
    rate = motion_match_rate(pairs)
    print(sigma, rate.summary())
    assert rate.direction_rate == 1.0 and rate.speed_rate >= 0.95 and rate.colour_rate == 1.0


def test_robust_to_colour_shift_float_input_and_a_small_distractor():
    rng = np.random.default_rng(2)
    other = {"red": "blue", "green": "red", "blue": "yellow", "yellow": "green", "white": "red"}
    for s in CLIPS[:20]:
        v = _video(s).astype(np.float32) + rng.uniform(-35, 35, 3)  # a global tint, as a generator might drift
        v[:, 2:5, 2:5] = COLOURS[other[s.colour]]  # a still 3x3 blob of another colour
        r = track(np.clip(v, 0, 255) / 255.0, s.caption)
        assert r.matches, (s, r.direction, r.speed)


def test_shape_crossing_the_edge_is_tracked_without_a_jump():
    spec = ClipSpec("red", "square", "right", "fast", "large", (0.85, 0.5))  # crosses x = 1 within 17 frames
    r = track(_video(spec), spec.caption)
    assert r.direction == "right" and r.speed_class == "fast"
    steps = np.diff(r.path[:, 0])
    assert (steps >= 0).all() and steps.max() < 0.03, steps  # pixel-quantised: 0.77 px a frame at 64 px
    assert abs(r.path[-1, 0] - r.path[0, 0] - 16 * 0.012) < 0.02 and r.path[-1, 0] > 1.0  # unwrapped past the edge


def test_absent_colour_and_still_shape_do_not_match():
    s = ClipSpec("red", "circle", "left", "slow", "small", (0.5, 0.5))
    v = _video(s)
    absent = track(v, "a small blue circle moving left slow")
    assert not absent.colour_ok and absent.direction is None and not absent.matches
    still = track(np.repeat(v[:1], 17, axis=0), s.caption)
    assert still.colour_ok and still.direction is None and not still.direction_ok and not still.matches


def test_wrong_direction_or_speed_in_the_caption_is_caught():
    s = ClipSpec("green", "triangle", "up", "fast", "large", (0.4, 0.6))
    v = _video(s)
    assert track(v, s.caption).matches
    assert not track(v, "a large green triangle moving down fast").direction_ok
    assert not track(v, "a large green triangle moving up slow").speed_ok
    unnamed = track(v, "a green triangle")  # no direction or speed named: only the colour is checked
    assert unnamed.matches and unnamed.direction == "up"


def test_parse_caption():
    c = parse_caption("A small, RED circle moving left fast.")
    assert (c.colour, c.shape, c.direction, c.speed, c.size) == ("red", "circle", "left", "fast", "small")
    assert parse_caption("hello").colour is None


def test_colour_mask_counts_only_the_named_colour():
    s = ClipSpec("yellow", "circle", "down", "slow", "large", (0.5, 0.5))
    v = _video(s, frames=5)
    assert colour_mask(v, "yellow").sum() == (v == np.array(COLOURS["yellow"], np.uint8)).all(-1).sum()
    assert colour_mask(v, "red").sum() == 0


@pytest.mark.parametrize("video,match", [
    (np.zeros((17, 8, 8)), "frames >= 2"),
    (np.zeros((1, 8, 8, 3), np.uint8), "frames >= 2"),
    (np.zeros((4, 8, 8, 3), np.int32), "uint8 or floating"),
])
def test_bad_video_is_refused(video, match):
    with pytest.raises(ValueError, match=match):
        track(video, "a red square")


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="colour must be one of"):
        colour_mask(np.zeros((2, 8, 8, 3), np.uint8), "purple")
    with pytest.raises(ValueError, match="TrackConfig.min_present"):
        TrackConfig(min_present=2.0)
    with pytest.raises(TypeError, match="caption must be a string"):
        parse_caption(3)
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
