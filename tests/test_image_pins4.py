"""Pins on how images are read (``zoo.training.crop.to_rgb``) that no other test held: a 32-bit integer
(mode ``I``) image whose values stay at or below 255 is 8-bit data as it is; only values above 255 mean
16-bit samples to scale down."""

from __future__ import annotations

import numpy as np
from PIL import Image

from zoo.training.crop import to_rgb


def test_a_mode_i_image_whose_maximum_is_255_is_read_as_8_bit():
    """Values 0..255 in mode ``I`` (an 8-bit image held as int32) read as they are: scaling at a maximum of
    255 too (``>=``) would turn white 255 into 1, an almost black image."""
    image = Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32))
    assert image.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(image))[0, :, 0], [0, 128, 255])
    over = Image.fromarray(np.array([[0, 65535, 256]], dtype=np.int32))  # above 255: 16-bit samples
    np.testing.assert_array_equal(np.asarray(to_rgb(over))[0, :, 0], [0, 255, 1])
