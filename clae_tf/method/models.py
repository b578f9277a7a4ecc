"""ResNet encoders with a separate batch-norm path for adversarial inputs, and the projection head.

`model(x, training, adversarial)` returns (h, z): h the representation (global-pooled encoder
output), z = g(h) the L2-normalised projection. With `adversarial=True` every encoder BN uses its
adversarial twin (AdvProp); clean inputs never touch the twins and adversarial inputs never touch
the clean BNs. Convolutions and dense layers are shared between the two paths.
"""

import keras
import tensorflow as tf


# PyTorch's default init for conv and linear weights, kaiming_uniform(a=sqrt(5)), is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)): exactly this VarianceScaling. Matching it keeps the
# reference's early-training behaviour.
def _torch_init():
    return keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_in", distribution="uniform")


class DualBatchNorm(keras.layers.Layer):
    """A BatchNorm with an optional adversarial twin (own gamma/beta and running statistics)."""

    def __init__(self, momentum=0.1, adv_momentum=0.01, dual=False, synchronized=False, **kwargs):
        super().__init__(**kwargs)
        # Keras momentum is the weight of the old value: keras = 1 - pytorch.
        self.clean = keras.layers.BatchNormalization(
            momentum=1.0 - momentum, epsilon=1e-5, synchronized=synchronized, name="bn")
        self.adv = keras.layers.BatchNormalization(
            momentum=1.0 - adv_momentum, epsilon=1e-5, synchronized=synchronized,
            name="bn_adv") if dual else None

    def build(self, input_shape):
        self.clean.build(input_shape)
        if self.adv is not None:
            self.adv.build(input_shape)

    def call(self, x, training=False, adversarial=False):
        bn = self.clean
        if adversarial:
            if self.adv is None:
                raise ValueError("adversarial=True on a model built without the adversarial BNs")
            bn = self.adv
        if training and bn.trainable and _can_fuse(bn, x):
            return _fused_batch_norm_train(bn, x)
        return bn(x, training=training)


def _can_fuse(bn, x):
    """One fused kernel gives the same result unless the statistics span several replicas."""
    if x.shape.rank != 4 or bn.axis not in (-1, 3) or not (bn.center and bn.scale) or bn.renorm:
        return False
    ctx = tf.distribute.get_replica_context()
    return not (bn.synchronized and ctx is not None and ctx.num_replicas_in_sync > 1)


def _fused_batch_norm_train(bn, x):
    """Keras BatchNormalization(training=True) as one FusedBatchNormV3 (and one grad) op.

    Keras 3 builds training-mode BN from ~10 element-wise ops and reductions (20 more in the
    backward pass), which cost as much as the convolutions on a CPU at width 0.25. Same
    normalisation (biased batch variance, the layer's epsilon) and the same moving-statistics
    update as Keras. Statistics and scale/offset stay float32 when x is bfloat16.
    """
    y, mean, var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=tf.convert_to_tensor(bn.gamma), offset=tf.convert_to_tensor(bn.beta),
        mean=tf.constant([], tf.float32), variance=tf.constant([], tf.float32),
        epsilon=bn.epsilon, exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    # The op returns the unbiased (Bessel-corrected) variance; Keras tracks the biased one.
    n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
    var = var * ((n - 1.0) / tf.maximum(n, 1.0))
    bn.moving_mean.assign(bn.moving_mean * bn.momentum + mean * (1.0 - bn.momentum))
    bn.moving_variance.assign(bn.moving_variance * bn.momentum + var * (1.0 - bn.momentum))
    return tf.cast(y, bn.compute_dtype)


class _Block(keras.layers.Layer):
    """BasicBlock (ResNet-18/34) or Bottleneck (ResNet-50), post-activation as in the reference."""

    def __init__(self, filters, stride, bottleneck, bn, **kwargs):
        super().__init__(**kwargs)
        expansion = 4 if bottleneck else 1
        self.out_filters = filters * expansion
        convs = ([(1, 1, filters), (3, stride, filters), (1, 1, filters * 4)] if bottleneck
                 else [(3, stride, filters), (3, 1, filters)])
        self.convs = [_conv(f, k, s, name=f"conv{i}") for i, (k, s, f) in enumerate(convs)]
        self.bns = [bn(name=f"bn{i}") for i in range(len(convs))]
        self.stride = stride
        self._make_bn = bn
        self.shortcut_conv = self.shortcut_bn = None

    def build(self, input_shape):
        if self.stride != 1 or input_shape[-1] != self.out_filters:
            self.shortcut_conv = _conv(self.out_filters, 1, self.stride, name="shortcut_conv")
            self.shortcut_bn = self._make_bn(name="shortcut_bn")

    def call(self, x, training=False, adversarial=False):
        out = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            out = bn(conv(out), training=training, adversarial=adversarial)
            if i < len(self.convs) - 1:
                out = tf.nn.relu(out)
        shortcut = x
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_bn(self.shortcut_conv(x), training=training,
                                        adversarial=adversarial)
        return tf.nn.relu(out + shortcut)


def _torch_pad(x, pad, value):
    """Pads H and W by `pad` on every side, as PyTorch's `padding=pad` does.

    keras.ops, not tf.pad: Keras may call a layer on symbolic KerasTensors to infer shapes, and
    a tf op failing there left the enclosing model's name scope open (every variable created
    afterwards in the process got a "clae_model/" prefix)."""
    return keras.ops.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], constant_values=value)


def _padded_shape(input_shape, pad):
    shape = list(input_shape)
    for axis in (1, 2):
        if shape[axis] is not None:
            shape[axis] += 2 * pad
    return tuple(shape)


class _Conv2D(keras.layers.Conv2D):
    """A bias-free conv with PyTorch's symmetric zero padding k // 2 on every side.

    At stride 1 an odd kernel's "same" padding is already k // 2 on every side. At stride 2 TF's
    "same" pads only the bottom/right of an even input, so every output sits one pixel later
    than PyTorch's: a 3x3/2 conv would no longer line up with the 1x1/2 shortcut (pixels 0, 2,
    4, ... in both frameworks), nor the ImageNet stem's 7x7/2 conv with the reference's. Those
    convs pad explicitly and convolve "valid", which gives PyTorch's samples and output size
    floor((n + 2p - k) / s) + 1.

    A 1x1 conv with stride s > 1 (the downsampling shortcuts) reads only pixels 0, s, 2s, ...:
    it is computed as that subsampling, x[:, ::s, ::s], followed by a 1x1 stride-1 conv, with
    the same kernel. Sharp edge: TF 2.21's oneDNN CPU kernel for the filter gradient of a
    strided 1x1 conv corrupts the heap at odd batch sizes (a segfault or "double free" in the
    first train step). The subsampling is a 1x1 average pool of stride s (the same pixels): as
    fast as the strided conv forward and backward; a strided slice's gradient costs 2-3x as
    much on CPU.
    """

    def __init__(self, filters, kernel, stride, **kwargs):
        self.torch_pad = kernel // 2 if stride > 1 else 0
        self.subsample = stride if kernel == 1 and stride > 1 else 1
        super().__init__(filters, kernel, strides=stride // self.subsample,
                         padding="valid" if self.torch_pad else "same", use_bias=False,
                         kernel_initializer=_torch_init(), **kwargs)

    def call(self, inputs):
        if self.subsample > 1:  # x[:, ::s, ::s]: ceil(n / s) pixels per side
            inputs = keras.ops.average_pool(inputs, 1, self.subsample, padding="valid")
        if self.torch_pad:
            inputs = _torch_pad(inputs, self.torch_pad, 0.0)
        return super().call(inputs)

    def compute_output_shape(self, input_shape):
        shape = list(_padded_shape(input_shape, self.torch_pad))
        for axis in (1, 2):
            if shape[axis] is not None:
                shape[axis] = -(-shape[axis] // self.subsample)
        return super().compute_output_shape(tuple(shape))


class _MaxPool2D:
    """PyTorch's MaxPool2d(k, s, padding=k // 2): the border padded with -inf (never the max).

    A plain callable, not a Keras layer (it has no weights): as a MaxPooling2D subclass behind
    the 7x7/2 stem conv, Keras left the model's name scope open after the first call (every
    variable created later in the process got a "clae_model/" prefix; Keras 3.15)."""

    def __init__(self, pool, stride):
        self.pool, self.stride, self.torch_pad = pool, stride, pool // 2

    def __call__(self, x):
        x = _torch_pad(x, self.torch_pad, float("-inf"))
        return tf.nn.max_pool2d(x, self.pool, self.stride, "VALID")


def _conv(filters, kernel, stride, name):
    return _Conv2D(filters, kernel, stride, name=name)


_LAYOUT = {"resnet10": ([1, 1, 1, 1], False), "resnet18": ([2, 2, 2, 2], False),
           "resnet34": ([3, 4, 6, 3], False), "resnet50": ([3, 4, 6, 3], True)}


class ContrastiveModel(keras.Model):
    """ResNet encoder f and projection head g: x -> (h, z)."""

    def __init__(self, arch="resnet18", stem="cifar", width=1.0, head="mlp", proj_hidden=0,
                 proj_dim=64, bn_momentum=0.1, bn_adv_momentum=0.01, dual_bn=False, sync_bn=False,
                 **kwargs):
        super().__init__(**kwargs)
        blocks, bottleneck = _LAYOUT[arch]

        def bn(name):
            return DualBatchNorm(bn_momentum, bn_adv_momentum, dual_bn, sync_bn, name=name)

        base = max(1, int(round(64 * width)))
        if stem == "cifar":
            self.stem_conv = _conv(base, 3, 1, name="stem_conv")
            self.stem_pool = None
        else:
            self.stem_conv = _conv(base, 7, 2, name="stem_conv")  # PyTorch: padding=3
            self.stem_pool = _MaxPool2D(3, 2)  # PyTorch: MaxPool2d(3, 2, padding=1)
        self.stem_bn = bn("stem_bn")
        self.blocks = []
        for stage, n in enumerate(blocks):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                self.blocks.append(_Block(base * 2 ** stage, stride, bottleneck, bn,
                                          name=f"stage{stage + 1}_block{i + 1}"))
        self.feature_dim = base * 8 * (4 if bottleneck else 1)
        hidden = proj_hidden or self.feature_dim
        # The heads have no BN (docs/method.md), so they are shared by both paths. "mlp": SimCLR's
        # and MoCo v2's h -> hidden -> ReLU -> z; "linear": Plain/UEL's h -> 128-d embedding.
        self.proj_hidden = keras.layers.Dense(
            hidden, activation="relu", kernel_initializer=_torch_init(),
            name="proj_hidden") if head == "mlp" else None
        self.proj_out = keras.layers.Dense(proj_dim, kernel_initializer=_torch_init(),
                                           name="proj_out")

    def call(self, x, training=False, adversarial=False):
        out = tf.nn.relu(self.stem_bn(self.stem_conv(x), training=training,
                                      adversarial=adversarial))
        if self.stem_pool is not None:
            out = self.stem_pool(out)
        for block in self.blocks:
            out = block(out, training=training, adversarial=adversarial)
        h = tf.reduce_mean(out, axis=[1, 2])  # (B, feature_dim)
        z = self.proj_out(self.proj_hidden(h) if self.proj_hidden is not None else h)
        # Losses and kNN work on the unit sphere; normalise in float32 (mixed precision).
        z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=-1)
        return tf.cast(h, tf.float32), z


def bn_layers(model):
    """All DualBatchNorm layers of `model` (for tests and inspection)."""
    return [layer for layer in model._flatten_layers() if isinstance(layer, DualBatchNorm)]
