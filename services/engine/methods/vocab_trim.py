"""Vocabulary trimming: keep the tokens a corpus uses, rebuild the tokenizer and the word embedding.

Tokens are counted on the task's fitting split (paragraphs that are never scored). The kept
tokens get new ids 0..K-1 in their original order, so [PAD] stays 0; the rebuilt tokenizer.json
keeps the normalizer, pre-tokenizer and post-processor (with the new [CLS]/[SEP] ids) and is
stored with the run, because the trimmed model only understands its own ids.

What becomes of a token the corpus never used (`unseen`):
- "pieces": single characters and their continuations are kept too, so a new word is spelled in
  smaller known pieces instead of becoming [UNK];
- "nearest": the tokenizer still knows every token and splits words exactly as before, but a
  dropped token reads the vector of the most similar kept token (several tokens share one row);
- "unknown": a word that cannot be assembled from kept tokens becomes [UNK].
"""
from services.engine.registry import Method, Param

UNSEEN = ("nearest", "pieces", "unknown")


def tokenizer_json(context):
    """Where the model's own tokenizer.json is: the MiniLM package, or an uploaded model's folder."""
    from pathlib import Path

    if context.model_id == "minilm-l6":
        from services.engine.families import minilm

        return minilm.package_dir() / "tokenizer.json"
    folder = getattr(context.adapter, "folder", None)
    return Path(folder) / "tokenizer.json" if folder is not None else None


def _remap_post_processor(processor: dict, new_id: dict) -> None:
    """Point the special tokens the post-processor inserts ([CLS], [SEP]) at their new ids."""
    if not processor:
        return
    for entry in (processor.get("special_tokens") or {}).values():  # TemplateProcessing
        entry["ids"] = [new_id[token] for token in entry["tokens"]]
    for key in ("cls", "sep"):  # BertProcessing / RobertaProcessing: [token, id]
        if isinstance(processor.get(key), list):
            processor[key][1] = new_id[processor[key][0]]
    for inner in processor.get("processors") or []:  # Sequence
        _remap_post_processor(inner, new_id)


def kept_tokens(spec: dict, texts: list[str], min_count: int, keep_pieces: bool,
                keep_frequent: int = 0) -> tuple[list[str], int]:
    """The tokens to keep, in their original id order, and how many of them were counted in `texts`."""
    import json
    from collections import Counter

    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(json.dumps(spec))
    counter.no_truncation()  # count every token of a paragraph, not only what fits in one input
    counter.no_padding()
    encodings = counter.encode_batch(texts, add_special_tokens=False)
    counts = Counter(token for encoding in encodings for token in encoding.tokens)
    vocab = spec["model"]["vocab"]
    prefix = spec["model"].get("continuing_subword_prefix", "##")
    used = {token for token, n in counts.items() if n >= min_count}
    keep = used | {t["content"] for t in spec.get("added_tokens", []) if t["content"] in vocab}
    keep.add(spec["model"]["unk_token"])
    if keep_pieces:
        # Single characters and their continuations: any word made of known characters can still be
        # spelled out in pieces, instead of becoming [UNK] as a whole.
        keep |= {t for t in vocab if len(t) == 1 or (t.startswith(prefix) and len(t) == len(prefix) + 1)}
    if keep_frequent:
        keep |= set(frequent_words(spec, keep_frequent))
    return sorted(keep, key=vocab.__getitem__), len(used)


def frequent_words(spec: dict, count: int) -> list[str]:
    """The vocabulary's `count` most frequent words. BERT's WordPiece vocabulary lists its words roughly
    from the most to the least frequent in its pre-training text (after the specials, unused slots and
    single characters): its first words are the everyday ones that a few thousand counted paragraphs
    may still miss."""
    vocab = spec["model"]["vocab"]
    prefix = spec["model"].get("continuing_subword_prefix", "##")
    words = [t for t in sorted(vocab, key=vocab.__getitem__)
             if not (t.startswith("[") and t.endswith("]")) and len(t.removeprefix(prefix)) > 1]
    return words[:count]


def nearest_kept(spec: dict, kept: list[str], weight) -> dict[str, int]:
    """For every dropped token, the new id of the kept token whose vector is most similar (cosine),
    among tokens of the same kind (a word start never stands in for a continuation '##…')."""
    import torch

    vocab = spec["model"]["vocab"]
    prefix = spec["model"].get("continuing_subword_prefix", "##")
    specials = {t["content"] for t in spec.get("added_tokens", [])}
    kept_set = set(kept)
    unit = torch.nn.functional.normalize(weight.detach().float(), dim=1)
    mapping = {}
    for continuation in (False, True):
        candidates = [i for i, t in enumerate(kept) if t.startswith(prefix) == continuation and t not in specials]
        dropped = [t for t in vocab if t not in kept_set and t.startswith(prefix) == continuation]
        if not candidates or not dropped:
            continue
        targets = unit[[vocab[kept[i]] for i in candidates]]
        for start in range(0, len(dropped), 4096):  # 4096 × K similarities at a time, not 30,000 × K
            chunk = dropped[start:start + 4096]
            best = (unit[[vocab[t] for t in chunk]] @ targets.T).argmax(1)
            mapping.update({t: candidates[int(b)] for t, b in zip(chunk, best)})
    return mapping


def apply(net, params: dict, context) -> None:
    import json

    import torch

    from services.engine.methods.share_embedding import token_table, word_embedding

    path = tokenizer_json(context)
    if path is None or not path.is_file():
        raise context.user_error("vocab.trim rebuilds the model's tokenizer.json, and this model has none; upload the "
                                 "model folder with its tokenizer.json (a fast tokenizer) to trim its vocabulary.")
    if not hasattr(context.adapter, "encode"):
        raise context.user_error("vocab.trim needs to encode the scored texts again with the rebuilt tokenizer, "
                                 "which is not possible for an uploaded model yet.")
    spec = json.loads(path.read_text(encoding="utf-8"))
    if (spec.get("model") or {}).get("type") != "WordPiece":
        raise context.user_error(f"vocab.trim rebuilds WordPiece vocabularies (BERT-like tokenizers); this model's "
                                 f"tokenizer is {(spec.get('model') or {}).get('type', 'of an unknown kind')}.")
    owner, embedding = word_embedding(net)
    table = token_table(embedding) if embedding is not None else None
    vocab = spec["model"]["vocab"]
    if table is None or table.num_embeddings != len(vocab):
        raise context.user_error("vocab.trim cannot find the word-embedding table that matches the tokenizer's "
                                 f"{len(vocab):,} tokens (was the vocabulary already trimmed?).")
    texts = context.fit_set().extra.get("texts")
    if not texts:
        raise context.user_error("vocab.trim counts tokens in the task's texts, and this task has none.")

    texts = list(texts)
    counted_in = f"{len(texts):,} fitting texts that are never scored"
    if params["extra_text"] and context.model_id == "minilm-l6":
        from services.engine.training_text import scored_texts, stdlib_paragraphs

        extra = stdlib_paragraphs(exclude=frozenset(scored_texts()) | frozenset(texts))
        texts += extra
        counted_in += f" and {len(extra):,} docstring paragraphs of Python's standard library"
    unseen = params["unseen"]
    context.progress(0.32, f"counting tokens in {len(texts)} texts")
    kept, counted = kept_tokens(spec, texts, params["min_count"], keep_pieces=unseen == "pieces",
                                keep_frequent=params["keep_frequent"])
    new_id = {token: index for index, token in enumerate(kept)}
    stand_ins = nearest_kept(spec, kept, table.weight) if unseen == "nearest" else {}

    # The embedding keeps only the rows of kept tokens, in the new order.
    pad_token = next((t for t, i in vocab.items() if i == table.padding_idx), None)
    old_ids = [vocab[token] for token in kept]
    if embedding is table:
        trimmed = torch.nn.Embedding(len(kept), table.embedding_dim)
        with torch.no_grad():
            trimmed.weight.copy_(table.weight[torch.tensor(old_ids)])
        owner.set_input_embeddings(trimmed)
    else:  # factorized by share.embedding: trim its narrow table (and its map of exact tokens)
        trimmed = embedding.keep_tokens(old_ids)
    trimmed.padding_idx = new_id.get(pad_token)
    if hasattr(getattr(owner, "config", None), "vocab_size"):
        owner.config.vocab_size = len(kept)

    # The tokenizer: same pipeline, vocabulary replaced, every id that names a token moved.
    spec["model"]["vocab"] = {**new_id, **stand_ins}
    for token in spec.get("added_tokens", []):
        token["id"] = new_id[token["content"]]
    _remap_post_processor(spec.get("post_processor"), new_id)
    if spec.get("padding") and spec["padding"].get("pad_token") in new_id:
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_token"]]
    out = context.scratch / "tokenizer.json"
    out.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    context.tokenizer_file = out

    how_often = "" if params["min_count"] == 1 else f", each seen at least {params['min_count']} times"
    if params["keep_frequent"]:
        how_often += f", and the vocabulary's {params['keep_frequent']:,} most frequent words"
    outside = {
        "pieces": "words outside them are split into smaller pieces (down to single characters)",
        "nearest": "words split into tokens as before, and each dropped token reads the vector of the most similar "
                   "kept one",
        "unknown": "words that cannot be built from them become [UNK], the unknown token",
    }[unseen]
    context.notes.append(
        f"Kept {len(kept):,} of {len(vocab):,} token vectors ({counted:,} tokens used in {counted_in}{how_often}); "
        f"{outside}. Use the model with the tokenizer.json stored with this run.")
    context.notes.append(
        "Risk: text unlike the counted paragraphs (other topics, names, other languages) is understood less well; "
        "the mean fidelity can stay high while the worst text drops a lot, so look at the worst.")


METHOD = Method(
    name="vocab.trim",
    title="Vocabulary trimming",
    explanation=(
        "Keeps only the words and word pieces that your kind of text uses and drops the rest of the "
        "embedding table (half of a small text model); text unlike the counted texts is understood less well."
    ),
    stage="torch",
    applies_to=("torch",),
    architectures=("text-transformer",),
    params=(
        Param("unseen", "choice", "nearest",
              "What a token outside the kept ones becomes: 'nearest' reuses the vector of the most similar kept "
              "token (words split as before); 'pieces' also keeps every single character, so a new word is spelled "
              "in smaller pieces (about 2,000 tokens more for BERT); 'unknown' turns such words into [UNK].",
              choices=UNSEEN),
        Param("min_count", "int", 1,
              "Keep a token only if it occurs at least this many times in the counted texts.",
              minimum=1, maximum=1000, step=1),
        Param("keep_frequent", "int", 0,
              "Also keep this many of the vocabulary's most frequent words (BERT-style vocabularies list them from "
              "the most frequent): everyday words the counted texts missed are then read exactly.",
              minimum=0, maximum=30000, step=500),
        Param("extra_text", "bool", False,
              "MiniLM: count tokens in the docstrings of Python's standard library too (about 2,800 paragraphs, none "
              "of them scored), so that everyday words the task's own texts happen to miss are kept: a larger table, "
              "a much better worst paragraph."),
    ),
    effect_note=("Parameters and file size fall with the embedding rows removed (MiniLM: 90 MB → 48-51 MB); latency "
                 "stays the same; words the counted texts never used are read approximately, which lowers the worst "
                 "paragraph much more than the mean. The run keeps its own tokenizer.json."),
    apply=apply,
)
