"""Weight clustering (weight sharing, Deep Compression's second stage): per layer, k-means over the
weight values; every weight is replaced by its cluster's centroid.

How it is stored, chosen by measurement (bench/lowrank_cluster.py): each clustered layer keeps an
8-bit index per weight plus a table of k+1 floats (a codebook), and computes
weight = codebook[indices] in forward. That exports as Identity -> Cast -> Gather on two
initializers; ONNX Runtime's constant folding turns it back into the dense float weight when it
loads the model, so the file is ~4x smaller for the clustered layers while inference runs the same
kernels as before: after loading, ONNX Runtime runs the very same operators as for the original
(bench/lowrank_cluster.py checks the optimized graph), latency ratios stayed within timing noise on
digits-cnn-x4 and minilm-l6, and session creation took 0.2-0.3 s instead of 0.18 s for MiniLM. A
runtime with graph optimizations switched off would gather the weights on every call. The Identity
is there because PyTorch's exporter would otherwise fold the Cast into an int64 copy of the indices,
8x larger than the uint8 ones. Keeping dense clustered float weights instead (the other option)
only shrinks the zipped file, as Deep Compression's Huffman stage does.

Index 0 always means an exact 0.0: weights a pruning step set to zero stay zero and are not
clustered (as in Deep Compression), and the indices are named `*.weight_quantized`, the suffix under
which measure.parameter_counts counts integer weights, with 0 as their zero: the parameter and
non-zero counts stay right.

Fitting: k-means (scikit-learn) on a sample of each layer's non-zero weights, started from evenly
spaced centroids between the smallest and the largest weight (Deep Compression's "linear"
initialization, which keeps the rare large weights their own centroids), then one pass over all
weights: nearest centroid, and each centroid moved to the mean of its weights.
"""
from __future__ import annotations

from functools import lru_cache

from services.engine.methods.lowrank_svd import (LAYER_CHOICES, layers_reaching_output, millions, replace_module,
                                                 tied_weight_ids, weight_layers)
from services.engine.registry import Method, Param

SAMPLE = 20_000  # weights per layer that k-means fits on; MiniLM's largest layer has 590 k
# scikit-learn's k-means run to convergence on the sample (~90 iterations from evenly spaced
# centroids, 0.1-0.2 s a layer), then one Lloyd step over all the weights. On minilm-l6 this kept
# the embeddings closest to the original (cosine 0.934 at 16 clusters, 0.994 at 64); stopping
# k-means at 30 iterations and then refining on all weights for 5 steps gave 0.919 and 0.9935.
KMEANS_ITERATIONS = 100
REFINE_STEPS = 1
SEED = 0


def fit_codebook(values, clusters: int):
    """(codebook, indices) for a float array: codebook[0] = 0.0, then up to `clusters` sorted
    centroids of the non-zero values; indices (uint8) point into the codebook, 0 for exact zeros."""
    import numpy as np
    from sklearn.cluster import KMeans

    flat = values.reshape(-1).astype(np.float64)
    nonzero = flat[flat != 0]
    if nonzero.size == 0:
        return np.zeros(1, np.float32), np.zeros(values.shape, np.uint8)
    distinct = np.unique(nonzero)
    if distinct.size <= clusters:
        centroids = distinct
    else:
        sample = nonzero
        if nonzero.size > SAMPLE:  # a sample fits the centroids; the extremes always belong to it
            rng = np.random.default_rng(SEED)
            sample = np.concatenate([rng.choice(nonzero, SAMPLE, replace=False), [distinct[0], distinct[-1]]])
        start = np.linspace(distinct[0], distinct[-1], clusters).reshape(-1, 1)
        kmeans = KMeans(n_clusters=clusters, init=start, n_init=1, max_iter=KMEANS_ITERATIONS, random_state=SEED)
        centroids = np.sort(kmeans.fit(sample.reshape(-1, 1)).cluster_centers_.reshape(-1))
        for _ in range(REFINE_STEPS):  # Lloyd step over every weight: each centroid -> mean of its weights
            assigned = _nearest(nonzero, centroids)
            sums = np.bincount(assigned, weights=nonzero, minlength=clusters)
            counts = np.bincount(assigned, minlength=clusters)
            centroids = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centroids))
    indices = np.zeros(flat.shape, np.uint8)
    indices[flat != 0] = _nearest(nonzero, centroids) + 1
    codebook = np.concatenate([[0.0], centroids]).astype(np.float32)
    return codebook, indices.reshape(values.shape)


def _nearest(values, sorted_centroids):
    """Index of the nearest centroid for each value (1-D: binary search between midpoints)."""
    import numpy as np

    return np.searchsorted((sorted_centroids[1:] + sorted_centroids[:-1]) / 2, values).astype(np.int64)


@lru_cache(maxsize=1)
def _classes():
    """The clustered layer and its lookup, built on first use (no torch when the registry loads)."""
    import torch
    import torch.nn.functional as F

    class Lookup(torch.autograd.Function):
        """codebook[indices]; exported as Identity -> Cast -> Gather so that the uint8 indices stay in
        the file (PyTorch's exporter folds a Cast of an initializer into int64, but not an Identity)."""

        @staticmethod
        def forward(ctx, codebook, indices):
            return codebook[indices.long()]

        @staticmethod
        def symbolic(g, codebook, indices):
            as_int64 = g.op("Cast", g.op("Identity", indices), to_i=7)  # 7 = TensorProto.INT64
            return g.op("Gather", codebook, as_int64, axis_i=0)

    class ClusteredLayer(torch.nn.Module):
        """A Linear or Conv1d/Conv2d whose weight is codebook[weight_quantized]."""

        def __init__(self, module, codebook, indices):
            super().__init__()
            self.kind = "linear" if isinstance(module, torch.nn.Linear) else type(module).__name__.lower()
            self.codebook = torch.nn.Parameter(torch.from_numpy(codebook), requires_grad=False)
            self.register_buffer("weight_quantized", torch.from_numpy(indices))
            self.bias = None if module.bias is None else torch.nn.Parameter(module.bias.detach().clone(),
                                                                            requires_grad=False)
            if self.kind != "linear":
                self.conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                                      groups=module.groups)

        @property
        def weight(self):
            return Lookup.apply(self.codebook, self.weight_quantized)

        def forward(self, x):
            if self.kind == "linear":
                return F.linear(x, self.weight, self.bias)
            convolve = F.conv1d if self.kind == "conv1d" else F.conv2d
            return convolve(x, self.weight, self.bias, **self.conv_args)

    return ClusteredLayer


def apply(model, params: dict, context) -> None:
    import numpy as np

    clusters = params["clusters"]
    layers = weight_layers(model, params["layers"])
    if not layers:
        what = {"all": "linear or convolution", "linear": "linear", "conv": "convolution"}[params["layers"]]
        raise context.user_error(f"This model has no {what} layers to cluster; choose another 'layers' "
                                 f"setting or another method.")
    reaching = layers_reaching_output(model, layers, context.adapter)
    tied = tied_weight_ids(model)
    clustered_layer = _classes()
    done, small, shared, weights, errors, kept_zeros = 0, 0, 0, 0, [], 0
    for index, (name, module) in enumerate(layers):
        context.progress(0.3 + 0.25 * index / len(layers), f"share.cluster: {name}")
        if name not in reaching:
            continue  # the exporter drops it: nothing to gain
        if id(module.weight) in tied:
            shared += 1
            continue
        if module.weight.numel() < params["min_weights"]:
            small += 1
            continue
        values = module.weight.detach().float().cpu().numpy()
        codebook, indices = fit_codebook(values, clusters)
        replace_module(model, module, clustered_layer(module, codebook, indices).to(module.weight.device))
        done += 1
        weights += values.size
        kept_zeros += int((indices == 0).sum())
        errors.append(float(np.linalg.norm(codebook[indices] - values) / max(np.linalg.norm(values), 1e-12)))
    if not done:
        raise context.user_error(
            f"No layer was clustered: {small} have fewer than {params['min_weights']:,} weights"
            + (f", {shared} share their weights with another layer" if shared else "")
            + ". Lower 'min_weights' or choose other layers.")
    left = [text for count, text in ((small, f"{small} with fewer than {params['min_weights']:,} weights"),
                                     (shared, f"{shared} that share their weights with another layer")) if count]
    context.notes.append(
        f"share.cluster: {done} layers ({millions(weights)} weights) now use at most {clusters} shared values "
        f"each" + (f" plus exact zeros ({millions(kept_zeros)} pruned weights kept at 0)" if kept_zeros else "")
        + f"; the weights moved by {100 * sum(errors) / len(errors):.1f}% of their norm on average"
        + (f"; left {' and '.join(left)} as they were" if left else "")
        + f". These layers are stored as 8-bit indices into a small table of values: "
          f"{weights * 4 / 2**20:.1f} MB of float weights → {weights / 2**20:.1f} MB of indices in the file "
          f"(fewer clusters also zip better). ONNX Runtime rebuilds the float weights when it loads the model, "
          f"so speed and memory in use are unchanged.")


METHOD = Method(
    name="share.cluster",
    title="Weight clustering (shared weights)",
    explanation=(
        "Groups each layer's weights into a few clusters and lets every weight take its cluster's value, "
        "so each weight is stored as a one-byte index into a small table: those layers take 4x less space "
        "in the file, the speed stays the same, and accuracy drops when there are too few clusters."
    ),
    stage="torch",
    applies_to=("torch",),
    # The weights become integer indices: a later pruning, factorization or quantization step could
    # not see float weights to work on, so validation refuses such steps after this one.
    quantizes=True,
    params=(
        # 64 by default: on minilm-l6, 16 clusters gave cosine 0.93 to the original embeddings, 64 gave
        # 0.994 (255: 0.9994), and the file is the same size for any count (one byte per weight).
        Param("clusters", "int", 64,
              "Shared values per layer (k-means centroids), up to 255 (one byte per weight). The file has the "
              "same size for any count; fewer clusters zip smaller and cost more accuracy. Pruned zeros stay "
              "exact zeros on top of these.", minimum=2, maximum=255, step=1),
        Param("min_weights", "int", 1024,
              "Leave layers with fewer weights than this alone (their few bytes are not worth a table).",
              minimum=0, maximum=100_000_000, step=256),
        Param("layers", "choice", "all",
              "Which layers to cluster: linear (fully connected) layers, convolutions, or both. "
              "Embedding tables are left alone.", choices=LAYER_CHOICES),
    ),
    effect_note=("The clustered layers take 4x fewer bytes in the file (8-bit indices; embedding tables stay "
                 "float), and fewer clusters zip smaller still. Parameter counts, memory in use and speed stay "
                 "the same: ONNX Runtime rebuilds the float weights when it loads the model, which takes a "
                 "little longer. Too few clusters cost accuracy."),
    apply=apply,
)
