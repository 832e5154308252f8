"""What prune.structured ranks and repairs with: the activations the model's layers see on the task's
fitting samples, a channel's contribution (Wanda's score, per channel), and the least-squares refit of
the layers that read what a pruning group removes. A helper module (its name starts with _): it
registers no method."""
from __future__ import annotations


class Ranking:
    """What a pruning step needs: an importance for Torch-Pruning (a callable on a group, one score
    per channel) and, with `refit`, the repair of the layers that read what a group removes."""

    def __init__(self, params: dict, model, context, readers):
        import torch_pruning as tp

        data_needed = params["importance"] == "contribution" or params["refit"]
        self.statistics = ChannelStatistics.measured(model, context, set(readers)) if data_needed else None
        if params["importance"] == "contribution":
            self.importance = self.statistics.contribution
        else:  # the group's weights (every layer a channel touches), as the L1 or L2 norm, averaged over the group
            self.importance = tp.importance.GroupMagnitudeImportance(p=1 if params["importance"] == "l1" else 2)
        self.refit = params["refit"]

    def prune(self, group) -> None:
        if self.refit:
            self.statistics.refit_readers(group)
        group.prune()


class ChannelStatistics:
    """What the model's layers see on the task's fitting samples (real tokens or frames only): per
    input channel its count, sum and sum of |x|, and for the linear layers that read prunable
    channels the sum of x x^T.

    contribution(group): how much each channel adds to the layers that read it, mean |activation| x
    the norm of the weights that read it (Wanda's score, per channel). Weight norms alone miss a
    channel that is rarely active, or one that is active but read by tiny weights.
    refit_readers(group): before a group goes, every linear layer that read its channels is refitted
    by least squares (its kept inputs and its bias take over what the removed ones predicted); a
    convolution gets the removed channels' mean folded into its bias (FLAP's bias compensation).
    """

    SAMPLES, BATCH = 128, 32
    DAMPING = 0.01  # ridge on the least-squares refit, relative to the mean input energy
    MAX_REFIT_INPUTS = 4096  # a wider linear layer gets the mean only (its x x^T would take too much memory)

    def __init__(self):
        self.count, self.sums, self.abs_sums, self.grams = {}, {}, {}, {}

    @classmethod
    def measured(cls, model, context, readers) -> "ChannelStatistics":
        import numpy as np
        import torch
        from torch import nn

        stats, state = cls(), {}
        names = list(context.adapter.input_names)
        # As this model sees them now: a step before this one may have rebuilt the tokenizer.
        inputs = context.reencode(context.fit_set()).inputs
        total = len(next(iter(inputs.values())))
        order = np.random.default_rng(0).permutation(total)[:min(cls.SAMPLES, total)]

        def hook(layer, args, _output):
            x = args[0].detach().float()
            mask = state.get("mask")
            if isinstance(layer, nn.Conv2d):
                rows = x.transpose(0, 1).flatten(1).T  # every pixel of every image, one row per pixel
            elif mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                rows = x[mask > 0]  # real tokens or frames only
            else:
                rows = x.reshape(-1, x.shape[-1])
            # float32 products (fast), float64 running sums (exact enough for the refit's solve)
            stats.count[layer] = stats.count.get(layer, 0) + rows.shape[0]
            stats.sums[layer] = stats.sums.get(layer, 0) + rows.sum(0).double()
            stats.abs_sums[layer] = stats.abs_sums.get(layer, 0) + rows.abs().sum(0).double()
            if layer in readers and isinstance(layer, nn.Linear) and layer.in_features <= cls.MAX_REFIT_INPUTS:
                stats.grams[layer] = stats.grams.get(layer, 0) + (rows.T @ rows).double()

        hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        try:
            with torch.no_grad():
                model.eval()
                for start in range(0, len(order), cls.BATCH):
                    rows = order[start:start + cls.BATCH]
                    feed = [torch.from_numpy(np.ascontiguousarray(inputs[n][rows])) for n in names]
                    state["mask"] = real_positions(dict(zip(names, feed)))
                    model(*feed)
        finally:
            for handle in hooks:
                handle.remove()
        return stats

    def contribution(self, group):
        import torch
        import torch_pruning as tp

        scores = torch.zeros(len(group[0].root_idxs), dtype=torch.float64)
        found = False
        for item in group:
            layer, handler = item.dep.target.module, item.dep.handler
            if handler not in (tp.prune_linear_in_channels, tp.prune_conv_in_channels) or layer not in self.count:
                continue
            # The norm of the weights that read each input channel: Linear (out, in), Conv (out, in, kh, kw).
            reading = layer.weight.detach().double().transpose(0, 1).flatten(1).norm(dim=1)
            local = (self.abs_sums[layer] / self.count[layer] * reading)[item.idxs]
            scores.scatter_add_(0, torch.tensor(item.root_idxs), local)
            found = True
        return scores.float() if found else None

    def refit_readers(self, group) -> None:
        import torch
        import torch_pruning as tp

        with torch.no_grad():
            for item in group:
                layer, handler = item.dep.target.module, item.dep.handler
                if handler in (tp.prune_linear_in_channels, tp.prune_conv_in_channels) and layer in self.count:
                    self._refit(layer, sorted(int(i) for i in item.idxs))

    def _refit(self, layer, removed: list[int]) -> None:
        import torch

        weight = layer.weight.detach().double()
        n = self.count[layer]
        kept = sorted(set(range(weight.shape[1])) - set(removed))
        with_bias = layer.bias is not None
        if layer not in self.grams or not kept:
            if with_bias:  # only the mean: conv kernels are summed over their positions
                w_removed = weight[:, removed].flatten(2).sum(2) if weight.dim() > 2 else weight[:, removed]
                layer.bias += (w_removed @ (self.sums[layer][removed] / n)).to(layer.bias.dtype)
            return
        # Second moments of [x, 1]: the constant input is the bias's, so the bias is refitted too.
        mean = self.sums[layer] / n
        gram = torch.cat([torch.cat([self.grams[layer] / n, mean[:, None]], 1),
                          torch.cat([mean, mean.new_ones(1)])[None, :]], 0)
        size = weight.shape[1]
        keep = kept + ([size] if with_bias else [])
        a = gram[keep][:, keep]
        a += self.DAMPING * torch.diagonal(a).mean() * torch.eye(len(keep), dtype=a.dtype)
        # The kept inputs' best linear prediction of the removed ones, and what that adds to the weights.
        change = weight[:, removed] @ torch.linalg.solve(a, gram[keep][:, removed]).T
        layer.weight[:, kept] += change[:, :len(kept)].to(layer.weight.dtype)
        if with_bias:
            layer.bias += change[:, len(kept)].to(layer.bias.dtype)


def real_positions(feed: dict):
    """(batch, positions) 1/0 for real tokens or frames, so padding does not count in the averages."""
    import torch

    if "attention_mask" in feed:
        return feed["attention_mask"].float()
    if "lengths" in feed and "features" in feed:
        frames = feed["features"].shape[1]
        return (torch.arange(frames)[None, :] < feed["lengths"][:, None]).float()
    return None
