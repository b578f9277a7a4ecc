"""What the offline tools over finished runs share (scripts/compare.py, robustness_table.py,
monitoring_figures.py): the mean and sample std over seeds, and a run's TensorBoard events.

Imported by those scripts from this folder (each puts it on sys.path, so that they also load
from their files, as the tests load them); not part of training: the clae_tf package does not
import it.

The events are read without TensorFlow (a TFRecord reader and TensorBoard's protos): compare.py
reads every run's events for its plots and needs nothing else of TensorFlow. On a smoke run's
events (python run.py --flagfile=flags/smoke.cfg; 2 cores at load 5-7), four tags read in
0.3-0.5 s this way (a fresh process, the call with its imports) and in 4.1-7.1 s through
tf.compat.v1.train.summary_iterator, nearly all of it TensorFlow's import. monitoring_figures.py
reads its events here too (it imports TensorFlow only to decode PNGs).
"""

import glob
import os
import statistics
import struct
from typing import Dict, List


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; nan for a single value), correctly rounded
    (statistics)."""
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, std


def _records(path: str):
    """The payloads of a TFRecord file (length, length crc, data, data crc; crcs not checked)."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            f.read(4)
            if len(payload) < length:
                return  # a file still being written
            yield payload


def summaries(logdir: str, tags):
    """(tag, step, value) of every summary of `tags` in the events files under logdir, file by
    file in name order (the order they were written), each file in its order; value: a numpy
    array (a scalar's is 0-d; an image's holds width, height and the PNG bytes)."""
    import numpy as np
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    tags = set(tags)
    paths = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))
    for path in paths:
        for payload in _records(path):
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                if v.tag not in tags:
                    continue
                if v.HasField("tensor"):
                    value = tensor_util.make_ndarray(v.tensor)
                else:
                    value = np.asarray(v.simple_value)
                yield v.tag, int(event.step), value


def read_scalars(logdir: str, tags) -> Dict[str, List[tuple]]:
    """{tag: [(step, value)]} from every events file under logdir, sorted by step (a step written
    twice, e.g. after a resume, keeps the last value)."""
    found: Dict[str, Dict[int, float]] = {t: {} for t in tags}
    for tag, step, value in summaries(logdir, tags):
        found[tag][step] = float(value)
    return {t: sorted(d.items()) for t, d in found.items()}
