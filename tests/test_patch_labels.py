"""Per-token shape labels for the vision tower (patch_labels.py) and the probe loss in a training run."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from qwenvl.training.patch_labels import (BACKGROUND, CHAR_POINTS, IGNORE, LABEL_COLUMNS, POSITION_SCALE, VisionProbe,
                                          shape_boxes, token_labels, token_places, unlabelled)
from qwenvl.synthetic.scenes import SHAPES, Shape, draw_shape
from qwenvl.synthetic.style import COLORS


def _grid(labels: torch.Tensor, rows: int, cols: int, column: int) -> list[list[int]]:
    return labels[:, column].view(rows, cols).tolist()


def test_filled_square_labels_the_tokens_it_covers_and_nothing_else():
    # 112 x 84 canvas seen at its own size: patch 14, merge 2 -> a 3 x 4 grid of 28-px tokens.
    red = Shape("square", "red", (28, 28, 56, 56), (255, 0, 0), filled=True)
    labels = token_labels([red], (112, 84), (6, 8), 14, 2)
    assert labels.shape == (12, LABEL_COLUMNS)
    red_class, square_class = 1 + COLORS.index("red"), 1 + SHAPES.index("square")
    colour = _grid(labels, 3, 4, 0)
    assert colour[1][1] == red_class and _grid(labels, 3, 4, 1)[1][1] == square_class
    assert sum(v != BACKGROUND for row in colour for v in row) == 1
    assert labels[5, 2:6].tolist() == [5, 5, 5, 5]       # half a token from its centre to each edge
    assert labels[5, 6].item() == 1                                  # the only square in the scene
    assert (labels[0, 2:] == IGNORE).all()                            # background tokens: no box, no count
    assert (labels[:, 7:] == IGNORE).all()                            # a shape scene has no characters


def test_each_shape_token_counts_the_shapes_of_its_own_kind():
    # 168 x 56: a 2 x 6 grid of tokens; two circles and a triangle, one per token column pair
    shapes = [Shape("circle", "red", (0, 0, 56, 56), (255, 0, 0), filled=True),
              Shape("triangle", "blue", (56, 0, 112, 56), (0, 0, 255), filled=True),
              Shape("circle", "green", (112, 0, 168, 56), (0, 160, 0), filled=True)]
    labels = token_labels(shapes, (168, 56), (4, 12), 14, 2)
    kind, count = _grid(labels, 2, 6, 1), _grid(labels, 2, 6, 6)
    circle, triangle = 1 + SHAPES.index("circle"), 1 + SHAPES.index("triangle")
    for row in range(2):
        for col in range(6):
            if kind[row][col] == circle:
                assert count[row][col] == 2
            elif kind[row][col] == triangle:
                assert count[row][col] == 1
            else:
                assert count[row][col] == IGNORE
    assert {circle, triangle} <= {k for r in kind for k in r}


def test_edge_distances_are_from_each_token_centre_in_tenths_of_a_token():
    # 224 x 56 seen at its own size: a 2 x 8 grid of tokens; a bar 3 tokens wide, 2 high, from token column 2
    bar = Shape("square", "green", (56, 0, 140, 56), (0, 160, 0), filled=True)
    labels = token_labels([bar], (224, 56), (4, 16), 14, 2)
    edges = labels[:, 2:6].view(2, 8, 4)
    assert edges[0, 2].tolist() == [5, 5, 25, 15]     # its top-left token: the left and top edges half a token away
    assert edges[1, 4].tolist() == [25, 15, 5, 5]     # its bottom-right token
    assert edges[0, 3].tolist() == [15, 5, 15, 15]
    assert (edges[:, [0, 1, 5, 6, 7]] == IGNORE).all()  # background: no edges
    # the same scene at half the resolution: distances are in tokens of the image the model sees
    small = token_labels([bar], (224, 56), (2, 8), 14, 2).view(1, 4, LABEL_COLUMNS)
    assert small[0, 1, 2:6].tolist() == [5, 5, 10, 5]


def test_an_outlined_circle_is_background_inside_and_the_image_is_rescaled():
    ring = Shape("circle", "blue", (0, 0, 168, 168), (0, 0, 255), filled=False, width=3)
    # drawn at 168 x 168, seen at 84 x 84 (grid 6 x 6 patches -> 3 x 3 tokens): only the rim is blue.
    labels = token_labels([ring], (168, 168), (6, 6), 14, 2)
    colour = _grid(labels, 3, 3, 0)
    assert colour[1][1] == BACKGROUND                          # the inside of an outline is background
    assert colour[0][1] == 1 + COLORS.index("blue")            # the rim crosses the top middle token
    # the labels agree with the pixels: the centre token of the drawn image holds no ink
    img = Image.new("RGB", (168, 168), "white")
    draw_shape(ImageDraw.Draw(img), ring)
    assert img.getpixel((84, 84)) == (255, 255, 255)


def test_probe_loss_ignores_unlabelled_tokens_and_trains_every_head():
    probe = VisionProbe(8)
    vision = torch.randn(5, 8, requires_grad=True)
    assert probe.loss(vision, unlabelled(5)).item() == 0.0
    shape_columns = torch.tensor([[0, 0, -1, -1, -1, -1, -1], [3, 2, 5, -1, 25, 15, 2], [IGNORE] * 7,
                                  [1, 1, 5, 5, 5, 5, 1], [0, 0, -1, -1, -1, -1, -1]])
    labels = torch.cat([shape_columns, torch.full((5, CHAR_POINTS), IGNORE)], 1)      # no reading scene here
    loss = probe.loss(vision, labels)
    loss.backward()
    assert loss.item() > 0
    assert probe.colour.weight.grad.abs().sum() > 0 and probe.kind.weight.grad.abs().sum() > 0
    assert probe.edges.weight.grad.abs().sum() > 0 and probe.count.weight.grad.abs().sum() > 0
    assert vision.grad[2].abs().sum() == 0                     # the ignored token gets no gradient


def test_token_places_are_centres_as_fractions_of_each_image_in_raster_order():
    # two images: 2 x 3 tokens (grid 4 x 6 patches), then one token (grid 2 x 2)
    places = token_places(torch.tensor([[1, 4, 6], [1, 2, 2]]), merge_size=2)
    assert places.shape == (7, 4)
    assert torch.allclose(places[:3, 0], torch.tensor([1 / 6, 3 / 6, 5 / 6]))    # first row: x steps by a token
    assert torch.allclose(places[:3, 1], torch.full((3,), 0.25))
    assert torch.allclose(places[3, :2], torch.tensor([1 / 6, 0.75]))             # second row starts at the left
    assert places[0, 2:].tolist() == [3, 2] and places[6].tolist() == [0.5, 0.5, 1, 1]


def test_every_token_of_a_shape_points_at_the_same_box_as_fractions_of_the_image():
    # 224 x 56 seen at its own size (2 x 8 tokens): a bar over token columns 2-4, both rows
    bar = Shape("square", "green", (56, 0, 140, 56), (0, 160, 0), filled=True)
    labels = token_labels([bar], (224, 56), (4, 16), 14, 2)
    places = token_places(torch.tensor([[1, 4, 16]]), 2)
    on_shape = labels[:, 6] != IGNORE
    boxes = shape_boxes(labels[on_shape], places[on_shape])
    assert boxes.shape == (6, 4)
    assert torch.allclose(boxes, torch.tensor([[56 / 224, 0.0, 140 / 224, 1.0]]).expand(6, 4), atol=1e-6)


def test_position_heads_learn_place_and_box_and_skip_unlabelled_tokens():
    probe = VisionProbe(24)          # wider than the 16 labelled tokens: a linear fit can be exact
    bar = Shape("square", "green", (56, 0, 140, 56), (0, 160, 0), filled=True)
    labels = torch.cat([token_labels([bar], (224, 56), (4, 16), 14, 2), unlabelled(4)])
    places = token_places(torch.tensor([[1, 4, 16], [1, 4, 4]]), 2)
    hidden = torch.randn(20, 24, requires_grad=True)
    loss = probe.position_loss(hidden, labels, places)
    loss.backward()
    assert loss.item() > 0
    assert probe.place.weight.grad.abs().sum() > 0 and probe.box.weight.grad.abs().sum() > 0
    assert hidden.grad[16:].abs().sum() == 0                   # the unlabelled image's tokens get no gradient
    assert probe.position_loss(hidden, unlabelled(20), places).item() == 0.0
    # heads that output the right answer have (almost) no loss: fit them by least squares on these tokens
    with torch.no_grad():
        x = torch.cat([hidden[:16], torch.ones(16, 1)], 1)
        on_shape = labels[:16, 6] != IGNORE
        for head, target, rows in ((probe.place, places[:16, :2], slice(None)),
                                   (probe.box, shape_boxes(labels[:16][on_shape], places[:16][on_shape]), on_shape)):
            solution = torch.linalg.lstsq(x[rows], target * POSITION_SCALE).solution     # [25, k]
            head.weight.copy_(solution[:24].T)
            head.bias.copy_(solution[24])
    assert probe.position_loss(hidden, labels, places).item() < 1e-3
