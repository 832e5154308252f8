"""ALBERT's factorized embedding: the vocabulary × hidden word-embedding table becomes a
vocabulary × E table followed by an E × hidden projection, started from a truncated SVD."""
from services.engine.registry import Method, Param


def word_embedding(net):
    """(owner, module): the transformers model inside `net` and its token-embedding module, or
    (None, None). transformers' own get/set_input_embeddings find it in any architecture it knows."""
    for module in net.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if not callable(getter) or not callable(getattr(module, "set_input_embeddings", None)):
            continue
        try:
            embedding = getter()
        except (NotImplementedError, AttributeError):  # a model class that does not say where it is
            continue
        if embedding is not None:
            return module, embedding
    return None, None


def factorized_embedding(table, projection, exact_ids=None, exact_rows=None):
    """This method's word embedding: token id → narrow `table` row → `projection` to full width, plus,
    for the tokens in `exact_ids`, a full-width correction (`exact_rows`, one per id) that gives those
    tokens back their original vector exactly. Built here so that torch is imported only when used."""
    import torch
    from torch import nn

    class FactorizedEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.table, self.projection = table, projection
            self.exact = None
            if exact_ids is not None and len(exact_ids):
                # slot[id] = 1 + the id's row in `exact` (0: an all-zero row, no correction). int16 when
                # it fits: the map is stored in the ONNX file, 2 bytes per vocabulary entry.
                kind = torch.int16 if len(exact_ids) < 2 ** 15 else torch.int32
                slots = torch.zeros(table.num_embeddings, dtype=kind)
                slots[torch.as_tensor(exact_ids)] = torch.arange(1, len(exact_ids) + 1, dtype=kind)
                self.register_buffer("slots", slots)
                self.exact = nn.Embedding(len(exact_ids) + 1, projection.out_features, padding_idx=0)
                with torch.no_grad():
                    self.exact.weight.zero_()
                    self.exact.weight[1:] = exact_rows

        def forward(self, input_ids):
            out = self.projection(self.table(input_ids))
            if self.exact is not None:
                # index_select exports to one Gather (plain indexing goes through ONNX's older index path)
                slots = torch.index_select(self.slots, 0, input_ids.reshape(-1)).reshape(input_ids.shape)
                out = out + self.exact(slots.long())
            return out

        def keep_tokens(self, old_ids):
            """vocab.trim: keep these vocabulary rows (and their corrections), in this order."""
            rows = torch.as_tensor(old_ids)
            trimmed = nn.Embedding(len(rows), self.table.embedding_dim)
            with torch.no_grad():
                trimmed.weight.copy_(self.table.weight[rows])
            self.table = trimmed
            if self.exact is not None:
                self.slots = self.slots[rows].clone()
            return trimmed

    return FactorizedEmbedding()


def token_table(embedding):
    """The (vocabulary × width) nn.Embedding that token ids index: the module itself, or the narrow
    table of a factorized one (this method's)."""
    import torch

    # Exact types: a subclass (a scaled embedding, say) may do more in forward than a lookup.
    if type(embedding) is torch.nn.Embedding:
        return embedding
    if type(embedding).__name__ == "FactorizedEmbedding" and type(getattr(embedding, "table", None)) is torch.nn.Embedding:
        return embedding.table
    return None


def _token_counts(context, vocabulary: int):
    """How often each token id occurs in the fitting split (real tokens only), or None when its
    inputs are not token ids of this table."""
    import torch

    feed = context.reencode(context.fit_set()).inputs  # a trimmed vocabulary's own ids, if a step rebuilt it
    ids, mask = feed.get("input_ids"), feed.get("attention_mask")
    if ids is None:
        return None
    used = ids[mask.astype(bool)] if mask is not None and mask.shape == ids.shape else ids.ravel()
    if used.size == 0 or used.min() < 0 or used.max() >= vocabulary:
        return None
    return torch.bincount(torch.from_numpy(used.astype("int64")), minlength=vocabulary)


def apply(net, params: dict, context) -> None:
    import torch

    owner, embedding = word_embedding(net)
    if embedding is None:
        raise context.user_error("This model has no word-embedding table that transformers can point to, so there "
                                 "is nothing to factorize; share.embedding works on BERT-like text encoders.")
    if type(embedding) is not torch.nn.Embedding:
        already = token_table(embedding) is not None
        raise context.user_error("The word embedding is already factorized; remove the second share.embedding step."
                                 if already else
                                 f"The word embedding is a {type(embedding).__name__}, not a plain table of token "
                                 f"vectors, so share.embedding cannot factorize it.")
    rank = params["E"]
    vocabulary, hidden = embedding.weight.shape
    if rank >= hidden:
        raise context.user_error(f"E must be smaller than the model's hidden size ({hidden}); got {rank}. "
                                 f"A factorized table with E ≥ {hidden} is no smaller than the original.")
    if rank * (vocabulary + hidden) >= vocabulary * hidden:
        raise context.user_error(f"With only {vocabulary} tokens, a {vocabulary} × {rank} table plus a {rank} × "
                                 f"{hidden} projection is no smaller than the original table; choose a smaller E.")
    context.progress(0.35, f"factorizing the {vocabulary} × {hidden} word embedding to E = {rank}")
    counts = _token_counts(context, vocabulary) if params["weight_by_use"] or params["exact_tokens"] else None
    # Add-one: a token the fitting texts never used still counts a little.
    weighted = counts is not None and params["weight_by_use"]
    weights = counts.double() + 1.0 if weighted else torch.ones(vocabulary, dtype=torch.float64)
    with torch.no_grad():
        # Truncated SVD of the table with each row weighted by how often its token is used: the
        # E directions that best keep the vectors of frequent tokens (plain SVD treats the 30,000
        # rare tokens alike and misses the common ones: MiniLM at E = 256 kept cosine 0.85, weighted 0.99).
        original = embedding.weight.double()
        # Its right singular vectors are the eigenvectors of the small hidden × hidden Gram matrix
        # (under a second where the SVD of the full table takes four).
        energies, vectors = torch.linalg.eigh(original.T @ (original * weights[:, None]))  # ascending
        energies, vectors = energies.flip(0).clamp(min=0), vectors.flip(1)
        basis = vectors[:, :rank].T  # E × hidden, orthonormal rows
        table = torch.nn.Embedding(vocabulary, rank, padding_idx=embedding.padding_idx)
        table.weight.copy_((original @ basis.T).float())  # every row projected onto the E directions
        projection = torch.nn.Linear(rank, hidden, bias=False)
        projection.weight.copy_(basis.T.float())  # Linear computes x @ weight.T = x @ basis
        energy = float(energies[:rank].sum() / energies.sum())
        # The most-used tokens keep their own vector: a full-width correction row each (what the
        # narrow table misses). Measured on MiniLM's held-out paragraphs, fp32: E = 128 alone keeps
        # the worst paragraph at cosine 0.862; with the 1,000 most-used tokens exact, 0.933.
        exact_ids = exact_rows = None
        if params["exact_tokens"]:
            if counts is None:
                raise context.user_error("exact_tokens keeps the tokens the task's fitting texts use most, and this "
                                         "task's inputs are not token ids of this table; set exact_tokens to 0.")
            used = int((counts > 0).sum())
            exact_ids = torch.argsort(counts, descending=True, stable=True)[:min(params["exact_tokens"], used)]
            exact_rows = (original[exact_ids] - original[exact_ids] @ basis.T @ basis).float()
    # Called with token ids like the table it replaces; exports to Gather + MatMul (+ Gather, Add).
    owner.set_input_embeddings(factorized_embedding(table, projection, exact_ids, exact_rows))
    kept = 0 if exact_ids is None else len(exact_ids)
    before, after = vocabulary * hidden, rank * (vocabulary + hidden) + kept * hidden
    exact_note = (f", plus the full {hidden}-wide vectors of the {kept:,} tokens the fitting texts use most "
                  f"(and a {vocabulary:,}-entry map of which tokens have one)" if kept else "")
    context.notes.append(
        f"The word embedding was factorized to {vocabulary:,} × {rank} + {rank} × {hidden}{exact_note}: {after:,} "
        f"numbers instead of {before:,}; the rank-{rank} approximation keeps {100 * energy:.1f}% of the table's "
        f"energy{', weighted by how often texts that are not scored use each token' if weighted else ''}"
        f" (no retraining).")


METHOD = Method(
    name="share.embedding",
    title="Factorized embedding (ALBERT)",
    explanation=(
        "Replaces the large table of word vectors with a narrow table and a small projection (ALBERT's "
        "factorized embedding), which shrinks a small text model a lot; word vectors are approximated, so "
        "the output moves away from the original the narrower the table is."
    ),
    stage="torch",
    applies_to=("torch",),
    architectures=("text-transformer",),
    params=(
        Param("E", "int", 128,
              "Width of the narrow table (must be below the model's hidden size, 384 for MiniLM): smaller "
              "saves more and approximates the word vectors less well.",
              minimum=8, maximum=1024, step=8),
        Param("weight_by_use", "bool", True,
              "Fit the narrow table best for the tokens that the task's fitting texts (never scored) use most; "
              "off = plain SVD, every token alike, which keeps common words less well."),
        Param("exact_tokens", "int", 0,
              "Keep this many of the tokens the fitting texts use most at their full, exact vector (a correction "
              "row each, stored at full width): common words lose nothing, at hidden-size numbers per token. "
              "0 = none.", minimum=0, maximum=50000, step=500),
    ),
    effect_note=("Parameters and file size fall (MiniLM's 11.7 M-number table becomes 3.96 M at E = 128); latency "
                 "barely changes (one small matrix multiply more); fidelity falls as E shrinks."),
    apply=apply,
)
