"""Data: where images come from (sources: the bundled digits, image folders, TFDS), how two
views of an image are made (augment, augment_kerascv, views) and the per-epoch streams of
view pairs (streams, memory). Imports runtime/ only; knows nothing of the model."""
