"""Localisation on the annotation grid (xbl.query.clustering.localise_cells): a concept planted at a
known cell is found there, with the extent the annotator marked."""

from __future__ import annotations

import numpy as np

from xbl.explain.cells import cells_to_mask
from xbl.query.clustering import fit_concept, localise_cells, marked_cells


def planted(cell_rc: tuple[int, int] | None, rng, strength: float = 3.0) -> np.ndarray:
    """(C,14,14) activations, as SmallCNN's last_conv on 28 px (2×2 positions per 4-px cell):
    noise, plus channel 0 raised over the positions of one cell."""
    acts = rng.normal(0.0, 0.3, (6, 14, 14))
    if cell_rc is not None:
        r, c = cell_rc
        acts[0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] += strength
    return acts


def test_the_concept_is_found_in_its_cell_with_the_answers_extent():
    rng = np.random.default_rng(0)
    rep, mark = planted((0, 0), rng), cells_to_mask([(0, 0)], 4, 28, 28)
    assert marked_cells(mark, 4) == 1
    concept = fit_concept(rep, mark)
    places = [(6, 6), (0, 6), (3, 2), None]
    members = np.stack([planted(p, rng) for p in places])
    carried = localise_cells(concept, members, (28, 28), cell=4, cells=1, threshold=0.5)
    for n, place in enumerate(places[:3]):
        assert np.array_equal(carried.masks[n], cells_to_mask([place], 4, 28, 28))
        # a cell averages the bilinearly upsampled strength: the neighbours pull it below 1
        assert carried.confidence[n] > 0.6
    assert not carried.masks[3].any()  # nothing like the mark: no cell reaches the threshold
    assert carried.confidence[3] < 0.5
    assert carried.confident(0.6).tolist() == [True, True, True, False]


def test_the_extent_follows_the_number_of_cells_marked():
    rng = np.random.default_rng(1)
    rep = planted((2, 2), rng)
    rep[0, 4:6, 6:8] += 3.0  # the mark spans two cells
    mark = cells_to_mask([(2, 2), (2, 3)], 4, 28, 28)
    concept = fit_concept(rep, mark)
    member = planted((5, 1), rng)
    member[0, 10:12, 4:6] += 3.0
    for cells, expected in ((2, [(5, 1), (5, 2)]), (1, None)):
        got = localise_cells(concept, member[None], (28, 28), 4, cells).masks[0]
        if expected is None:
            assert marked_cells(got, 4) == 1
        else:
            assert np.array_equal(got, cells_to_mask(expected, 4, 28, 28))
