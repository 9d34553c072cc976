"""Crack maps (evaluation/crack_maps.py): tiles from a map agree with the tile rule at
every threshold; length, width and count of hand-drawn cracks; pixel precision and recall
with a tolerance on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from crack_lightning.data.masks import CRACK, tile_boxes, tile_is_crack
from crack_lightning.errors import ConfigError
from crack_lightning.evaluation.crack_maps import (
    crack_measures,
    pixels_needed,
    skeleton_steps,
    tile_probs_from_map,
    tolerant_scores,
)

# --- tiles from a map ------------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, 11])  # continuous, and few levels (many ties)
@pytest.mark.parametrize(("size", "stride", "min_share"), [(32, 16, 0.01), (20, 7, 0.3), (9, 9, 1)])
def test_tile_probs_agree_with_the_tile_rule_at_every_threshold(size, stride, min_share, levels):
    rng = np.random.default_rng(size)
    prob = rng.random((101, 77)) ** 3  # 101 x 77: the last tiles of a row sit flush
    if levels:
        prob = np.round(prob * (levels - 1)) / (levels - 1)
    boxes = tile_boxes(77, 101, size, stride)
    tiles = tile_probs_from_map(prob, boxes, size, min_share)
    thresholds = [0.0, 0.05, 0.2, 0.5, 0.9, 1.0, *np.unique(prob)[::97]]
    for threshold in thresholds:
        rule = tile_is_crack(prob >= threshold, boxes, size, min_share) == CRACK
        np.testing.assert_array_equal(tiles >= threshold, rule, err_msg=f"T={threshold}")


def test_tiles_reaching_past_the_edge_count_the_part_inside():
    rng = np.random.default_rng(3)
    prob = rng.random((50, 45))
    boxes = np.array([(0, 0), (30, 0), (30, 40), (40, 45 - 1), (10, 20)])  # 3 clipped
    tiles = tile_probs_from_map(prob, boxes, 20, 0.05)
    for threshold in np.unique(prob)[::50]:
        rule = tile_is_crack(prob >= threshold, boxes, 20, 0.05) == CRACK
        np.testing.assert_array_equal(tiles >= threshold, rule)
    # the tile at (40, 44) holds 6 x 5 = 30 pixels: k = ceil(0.05 * 30) = 2, the 2nd largest
    assert tiles[3] == np.sort(prob[44:, 40:].ravel())[-2]


def test_a_tile_prob_is_the_kth_largest_pixel_worked_out_by_hand():
    # 10 x 10 tile, min_share 0.07: 0.07 * 100 is 7.000000000000001 in floating point,
    # yet 7 crack pixels make a share 7 / 100 >= 0.07: k is 7, not 8
    assert pixels_needed(100, 0.07) == 7
    assert pixels_needed(16384, 0.01) == 164  # a 128 px tile at 1%: ceil(163.84)
    assert pixels_needed(100, 1.0) == 100 and pixels_needed(100, 1e-9) == 1
    prob = np.zeros((10, 10))
    prob.flat[:7] = [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4]
    assert tile_probs_from_map(prob, np.array([(0, 0)]), 10, 0.07)[0] == 0.4
    assert tile_probs_from_map(prob, np.array([(0, 0)]), 10, 0.02)[0] == 0.8
    assert tile_is_crack(prob >= 0.4, np.array([(0, 0)]), 10, 0.07)[0] == CRACK


# --- length, width and count ------------------------------------------------------------


def band(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    crack = np.zeros((height, width), dtype=bool)
    crack[rows, cols] = True
    return crack


def test_a_straight_band_100_long_3_wide():
    measures = crack_measures(band(20, 120, slice(8, 11), slice(10, 110)))
    assert measures.count == 1
    # the centre line from the first pixel's centre to the last's: 99 steps of 1
    assert measures.length == pytest.approx(99)
    # d = 2 along the centre row, 1 at its two end pixels (background beside them):
    # widths 3 (98 pixels) and 1 (2 pixels)
    assert measures.max_width == 3
    assert measures.mean_width == pytest.approx((98 * 3 + 2 * 1) / 100)
    (crack,) = measures.cracks
    assert crack.box == (10, 8, 100, 3) and crack.pixels == 300
    assert measures.length_mm is None and crack.length_mm is None


@pytest.mark.parametrize(("width", "measured"), [(1, 1), (5, 5), (2, 1)])
def test_width_counts_the_pixels_across_an_odd_band(width, measured):
    measures = crack_measures(band(30, 120, slice(10, 10 + width), slice(10, 110)))
    assert measures.max_width == measured


def test_a_diagonal_line_is_sqrt2_per_step():
    crack = np.zeros((60, 60), dtype=bool)
    index = np.arange(5, 55)  # 50 pixels corner to corner
    crack[index, index] = True
    measures = crack_measures(crack)
    assert measures.count == 1
    assert measures.length == pytest.approx(49 * math.sqrt(2))
    assert measures.max_width == 1


def test_steps_count_a_corner_of_the_line_once():
    # a 4-connected staircase (right, down, right, down, ...) of 30 pixels: 29 side
    # steps; its corner-to-corner neighbours are joined through a corner pixel already
    staircase = np.zeros((40, 40), dtype=bool)
    for i in range(15):
        staircase[5 + i, 5 + i : 7 + i] = True
    assert skeleton_steps(staircase)[2].sum() == pytest.approx(29)
    # an L: 5 down, then 5 right from the corner: 8 side steps, no diagonal
    corner = band(20, 20, slice(2, 7), slice(2, 3)) | band(20, 20, slice(6, 7), slice(2, 7))
    assert skeleton_steps(corner)[2].sum() == pytest.approx(8)
    # a cross: 4 arms of 3 side steps each meet at the centre
    cross = band(20, 20, slice(7, 8), slice(4, 11)) | band(20, 20, slice(4, 11), slice(7, 8))
    assert skeleton_steps(cross)[2].sum() == pytest.approx(12)


def test_two_lines_are_two_cracks_and_specks_are_dropped():
    crack = band(50, 100, slice(5, 7), slice(10, 90)) | band(50, 100, slice(30, 33), slice(10, 60))
    yy, xx = np.mgrid[:50, :100]
    crack |= (yy - 44) ** 2 + (xx - 80) ** 2 <= 4  # a disc of 13 pixels: under 20
    crack[45, 20] = True
    measures = crack_measures(crack)
    assert measures.count == 2
    assert measures.length == pytest.approx(79 + 49)
    assert [c.box for c in measures.cracks] == [(10, 5, 80, 2), (10, 30, 50, 3)]
    assert [c.length for c in measures.cracks] == pytest.approx([79, 49])
    # kept when the noise floor is lowered below the disc's 13 pixels
    assert crack_measures(crack, min_pixels=10).count == 3
    assert crack_measures(crack, min_pixels=1).count == 4


def test_the_figures_do_not_depend_on_where_the_cracks_lie_in_the_map():
    rng = np.random.default_rng(5)
    crack = np.zeros((60, 80), dtype=bool)
    crack[10:13, 5:70] = True  # a band
    crack[20:55, 40:42] |= rng.random((35, 2)) > 0.2  # a ragged vertical crack
    crack[58:, :30] = True  # a band in the bottom left corner
    alone = crack_measures(crack)
    # blank margins above and right: the corner band keeps its two edges (beyond an edge
    # is no background: a crack that runs out of the photo keeps its width there)
    placed = crack_measures(np.pad(crack, ((37, 0), (0, 90))))
    assert placed.count == alone.count >= 3
    assert (placed.length, placed.mean_width, placed.max_width) == pytest.approx(
        (alone.length, alone.mean_width, alone.max_width)
    )
    for moved, there in zip(placed.cracks, alone.cracks, strict=True):
        assert moved.box == (there.box[0], there.box[1] + 37, *there.box[2:])
        assert moved.length == pytest.approx(there.length)


def test_an_empty_map_has_no_crack():
    measures = crack_measures(np.zeros((30, 30), dtype=bool), mm_per_px=0.5)
    assert (measures.count, measures.length, measures.mean_width) == (0, 0.0, None)
    assert measures.length_mm == 0.0 and measures.cracks == []


def test_mm_figures_scale_by_the_pixel_size():
    measures = crack_measures(band(20, 120, slice(8, 11), slice(10, 110)), mm_per_px=0.1)
    assert measures.length_mm == pytest.approx(9.9)
    assert measures.max_width_mm == pytest.approx(0.3)
    assert measures.mean_width_mm == pytest.approx(0.1 * 2.96)
    assert measures.cracks[0].max_width_mm == pytest.approx(0.3)


@pytest.mark.parametrize("size", [0, -0.2])
def test_a_pixel_size_at_or_below_zero_is_refused_naming_the_setting(size):
    with pytest.raises(
        ConfigError, match=rf"^scan.mm_per_px={size} must be a pixel's size in mm > 0\.$"
    ):
        crack_measures(np.ones((5, 5), dtype=bool), mm_per_px=size)


# --- pixel precision and recall with a tolerance ------------------------------------------


def line(row: int, start: int = 10, stop: int = 90, shape=(40, 100)) -> np.ndarray:
    crack = np.zeros(shape, dtype=bool)
    crack[row, start:stop] = True
    return crack


def test_a_line_drawn_two_pixels_off_is_right_at_tolerance_2_and_wrong_at_1():
    truth, pred = line(20), line(22)
    at_two = tolerant_scores(pred, truth, 2)
    assert (at_two["precision"], at_two["recall"], at_two["f1"]) == (1.0, 1.0, 1.0)
    at_one = tolerant_scores(pred, truth, 1)
    assert (at_one["precision"], at_one["recall"], at_one["f1"]) == (0.0, 0.0, 0.0)
    assert at_one["predicted_pixels"] == at_one["crack_pixels"] == 80


def test_half_a_line_found_is_recall_one_half():
    scores = tolerant_scores(line(20, 10, 50), line(20, 10, 90), 2)
    # predicted 10..49, all on the line; truth 10..89 found up to 51 (2 px past the end)
    assert scores["precision"] == 1.0
    assert scores["found_pixels"] == 42 and scores["crack_pixels"] == 80
    assert scores["recall"] == pytest.approx(42 / 80)
    scores = tolerant_scores(line(20, 10, 50), line(20, 10, 90), 0)
    assert scores["recall"] == 0.5
    assert scores["f1"] == pytest.approx(2 * 0.5 / 1.5)


def test_a_diagonal_offset_counts_by_euclidean_distance():
    truth = np.zeros((10, 10), dtype=bool)
    truth[5, 5] = True
    pred = np.zeros_like(truth)
    pred[6, 6] = pred[7, 5] = pred[7, 7] = True  # sqrt(2), 2 and sqrt(8) away
    scores = tolerant_scores(pred, truth, 2)
    assert (scores["matched_pixels"], scores["predicted_pixels"]) == (2, 3)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == 1.0


def test_false_alarms_and_misses_on_empty_sides():
    empty = np.zeros((20, 20), dtype=bool)
    nothing = tolerant_scores(empty, empty)
    assert (nothing["precision"], nothing["recall"], nothing["f1"]) == (None, None, None)
    missed = tolerant_scores(empty, line(5, 2, 12, (20, 20)))
    assert (missed["precision"], missed["recall"], missed["f1"]) == (None, 0.0, 0.0)
    alarms = tolerant_scores(line(5, 2, 12, (20, 20)), empty)
    assert (alarms["precision"], alarms["recall"], alarms["f1"]) == (0.0, None, 0.0)
    with pytest.raises(ValueError, match="different shapes"):
        tolerant_scores(empty, np.zeros((20, 21), dtype=bool))
