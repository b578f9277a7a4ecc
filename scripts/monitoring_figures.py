"""PNG pictures of a finished run's monitoring, for the README (docs/monitoring/).

    python scripts/monitoring_figures.py --workdir=runs/digits_simclr_clae_seed0 \
        --out=docs/monitoring

Writes <out>/projector.png, a Projector-like view of the test embeddings the run wrote for
TensorBoard (<workdir>/tensorboard/projector: a 2-D PCA of the points, coloured by label, with a
few of the sprite's thumbnails), and <out>/nearest_neighbours.png, the first and the last
nearest-neighbour picture of the run's TensorBoard events, side by side. Prints the online kNN
accuracies and the cost of an online evaluation as a fraction of an epoch (results.json).
Needs matplotlib. An offline tool over finished runs: the clae_tf package does not import it.
"""

import argparse
import json
import os
import sys

import numpy as np

# Run as `python scripts/monitoring_figures.py` from a checkout, or loaded from its file (the
# tests): the repository root holds clae_tf, this folder report_lib.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

from report_lib import read_scalars, summaries  # noqa: E402

from clae_tf.runtime.config import Config  # noqa: E402  (after the path set-up)
from clae_tf.runtime.workdir import FLAGFILE, RESULTS_FILE, tensorboard_dir  # noqa: E402


def class_names(workdir, num_classes):
    """Folder names of an image-folder dataset (flags.cfg's --dataset), else the numbers."""
    with open(os.path.join(workdir, FLAGFILE)) as f:
        dataset = Config.parse_flagfile(f.read()).get("dataset", "")
    train = os.path.join(dataset, "train")
    if os.path.isdir(train):
        names = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
        if len(names) >= num_classes:
            return names
    return [str(i) for i in range(num_classes)]


def read_projector(logdir):
    """(features, labels, thumbnails) as the run wrote them for the projector."""
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorboard.plugins import projector
    config = projector.ProjectorConfig()
    with open(os.path.join(logdir, "projector_config.pbtxt")) as f:
        text_format.Parse(f.read(), config)
    (embedding,) = config.embeddings
    features = np.loadtxt(os.path.join(logdir, embedding.tensor_path), delimiter="\t", ndmin=2)
    labels = np.loadtxt(os.path.join(logdir, embedding.metadata_path), delimiter="\t",
                        skiprows=1, dtype=np.int64, ndmin=2)[:, 0]
    sprite = tf.io.decode_png(tf.io.read_file(
        os.path.join(logdir, embedding.sprite.image_path))).numpy()
    d = embedding.sprite.single_image_dim[0]
    m = sprite.shape[0] // d
    thumbs = sprite.reshape(m, d, m, d, 3).transpose(0, 2, 1, 3, 4).reshape(m * m, d, d, 3)
    return features, labels, thumbs[:len(features)], embedding.tensor_name


def neighbour_pictures(logdir):
    """{step: uint8 picture} of the run's monitor/nearest_neighbours images."""
    import tensorflow as tf
    # An image summary's tensor: width, height, the PNG.
    return {step: tf.io.decode_png(value[2]).numpy()
            for _, step, value in summaries(logdir, ("monitor/nearest_neighbours",))}


def projector_png(path, features, labels, thumbs, names, title, thumbnails=40):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    centred = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T  # (N, 2): the first two principal components
    fig, ax = plt.subplots(figsize=(9, 7.5), dpi=100)
    fig.patch.set_facecolor("#f5f5f5")
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for c in range(len(names)):
        mine = labels == c
        ax.scatter(xy[mine, 0], xy[mine, 1], s=9, color=colours(c % colours.N), alpha=0.75,
                   label=names[c], linewidths=0)
    # A few thumbnails at their points (every (N / thumbnails)-th point, so every class shows).
    for i in np.linspace(0, len(xy) - 1, thumbnails).astype(int):
        box = OffsetImage(thumbs[i], zoom=1.0)
        box.image.axes = ax
        ax.add_artist(AnnotationBbox(box, xy[i], frameon=True, pad=0.1,
                                     bboxprops=dict(edgecolor=colours(labels[i] % colours.N),
                                                    linewidth=1.5)))
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=2.5)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def neighbours_png(path, pictures, knn, scale=3):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = sorted(pictures)
    shown = [steps[0], steps[-1]] if len(steps) > 1 else steps
    accuracy = dict(knn)
    fig, axes = plt.subplots(1, len(shown), figsize=(6.2 * len(shown), 7), dpi=100)
    for ax, step in zip(np.atleast_1d(axes), shown):
        picture = pictures[step].repeat(scale, axis=0).repeat(scale, axis=1)  # crisp pixels
        ax.imshow(picture, interpolation="nearest")
        title = f"step {step}"
        if step in accuracy:
            title += f": online kNN top-1 {100 * accuracy[step]:.1f}%"
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    fig.suptitle("Test image (grey) and its 8 nearest training images under z: "
                 "green = same class, red = another", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default="docs/monitoring")
    args = parser.parse_args(argv)
    logdir = tensorboard_dir(args.workdir)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.workdir, RESULTS_FILE)) as f:
        results = json.load(f)
    features, labels, thumbs, name = read_projector(logdir)
    names = class_names(args.workdir, int(results["num_classes"]))
    projector_png(os.path.join(args.out, "projector.png"), features, labels, thumbs, names,
                  f"{len(features)} test embeddings ({name}), 2-D PCA, after step "
                  f"{results['step']}; kNN top-1 {100 * results['knn_top1']:.1f}%")
    curves = read_scalars(logdir, ("eval/knn_top1_online", "eval/online_seconds"))
    knn = curves["eval/knn_top1_online"]
    neighbours_png(os.path.join(args.out, "nearest_neighbours.png"), neighbour_pictures(logdir),
                   knn)
    print("online kNN top-1:", ", ".join(f"step {s}: {100 * a:.1f}%" for s, a in knn))
    seconds = curves["eval/online_seconds"]
    if seconds:
        # The train steps alone (no evaluation, logging or checkpoints), per epoch.
        per_epoch = results["train_seconds_this_process"] / results["epochs"]
        print(f"online evaluation vs an epoch's train steps ({per_epoch:.1f} s): " + ", ".join(
            f"step {s}: {t:.1f} s = {100 * t / per_epoch:.1f}%" for s, t in seconds))
    print(f"wrote {args.out}/projector.png, {args.out}/nearest_neighbours.png")


if __name__ == "__main__":
    main()
