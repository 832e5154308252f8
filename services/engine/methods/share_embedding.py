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


def token_table(embedding):
    """The (vocabulary × width) nn.Embedding that token ids index: the module itself, or the first
    half of a factorized one (this method's Embedding → Linear pair)."""
    import torch

    # Exact types: a subclass (a scaled embedding, say) may do more in forward than a lookup.
    if type(embedding) is torch.nn.Embedding:
        return embedding
    if type(embedding) is torch.nn.Sequential and len(embedding) == 2 and type(embedding[0]) is torch.nn.Embedding:
        return embedding[0]
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
    counts = _token_counts(context, vocabulary) if params["weight_by_use"] else None
    # Add-one: a token the fitting texts never used still counts a little.
    weights = torch.ones(vocabulary, dtype=torch.float64) if counts is None else counts.double() + 1.0
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
    # A plain Sequential: it is called with token ids like the table it replaces and exports to
    # Gather + MatMul; vocab.trim can still slice its first half.
    owner.set_input_embeddings(torch.nn.Sequential(table, projection))
    before, after = vocabulary * hidden, rank * (vocabulary + hidden)
    context.notes.append(
        f"The word embedding was factorized to {vocabulary:,} × {rank} + {rank} × {hidden}: {after:,} numbers "
        f"instead of {before:,}; the rank-{rank} approximation keeps {100 * energy:.1f}% of the table's energy"
        f"{'' if counts is None else ', weighted by how often texts that are not scored use each token'}"
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
    ),
    effect_note=("Parameters and file size fall (MiniLM's 11.7 M-number table becomes 3.96 M at E = 128); latency "
                 "barely changes (one small matrix multiply more); fidelity falls as E shrinks."),
    apply=apply,
)
