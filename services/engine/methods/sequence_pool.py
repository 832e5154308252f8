"""sequence.pool: shorten the sequence inside the encoder (once-for-all sequence compression).

For a sequence model the length of the sequence drives the cost: every layer after the pooling
works on ceil(T / rate) frames instead of T. The speech encoder averages neighbouring frames after
its first layer (services/engine/speech/model.py, TimePooling), at any rate from 1 to 8, fractional
ones included (a 20 ms frame period becomes 20 × rate ms). speech-ssl is fine-tuned once-for-all
(services/engine/speech/train.py: a new rate every step, rate 1 in a fifth of them), so this step
only sets the rate: no training, results in seconds, one model for every rate. A model fine-tuned at
rate 1 only (`trained_rates` [1, 1]) is pooled all the same, with a note that it was not trained for
it. For the built-in text encoder (minilm-l6) it merges similar tokens instead (Token Merging,
services/engine/families/token_merge.py), which needs no training either: every rate is a job of
seconds.
"""
from services.engine.registry import Method, Param

FRAME_MS = 20  # speech-ssl's log-mel hop


def apply(net, params: dict, context) -> None:
    from services.engine.speech.model import TimePooling

    if hasattr(net, "merge_rate"):
        _merge_tokens(net, params, context)
        return
    pool = getattr(net, "pool", None)
    if not isinstance(pool, TimePooling):
        raise context.user_error("sequence.pool needs the built-in speech encoder (which pools frames) or the "
                                 "built-in sentence encoder (which merges tokens); this model is neither.")
    low, high = (float(v) for v in net.trained_rates.tolist())
    rate = float(params["rate"])
    if params["learn_rate"]:
        rate = _learned_rate(net, params, context, high)
    pool.rate = rate
    context.extra_metrics["pooling_rate"] = rate
    where = f"after encoder layer {net.pool_after} of {len(net.layers)}"
    note = (f"sequence.pool: frames averaged {rate:.3g} to 1 {where}: a frame every {FRAME_MS * rate:.0f} ms instead "
            f"of {FRAME_MS} ms, so the later layers and the heads see {1 / rate:.0%} of the frames.")
    if rate == 1:
        note += " At rate 1 nothing is pooled: the model is the original."
    elif low <= rate <= high and high > 1:
        note += f" The model was trained once-for-all for rates {low:g}-{high:g}: no retraining was needed."
    else:
        note += (f" The model was fine-tuned for rates {low:g}-{high:g} only: expect a large drop at this rate "
                 "(retrain it once-for-all).")
    context.notes.append(note)


def _merge_tokens(net, params: dict, context) -> None:
    from services.engine.families.token_merge import schedule, work_share

    if params["learn_rate"]:  # refused at submit too (check): kept for direct callers
        raise context.user_error("Learning the rate is built for the speech encoder; for a text model, score a few "
                                 "rates (the Score every rate button) and pick from the curve.")
    layers = len(net.bert.encoder.layer)
    merge_after = min(int(params["merge_after"]), layers - 1)
    rate = float(params["rate"])
    net.merge_rate, net.merge_after = rate, merge_after
    context.extra_metrics["pooling_rate"] = rate
    if rate == 1:
        context.notes.append("sequence.pool at rate 1: no token is merged, the model is the original.")
        return
    from services.engine.families.minilm import MAX_TOKENS

    tokens = schedule(MAX_TOKENS, layers, rate, merge_after)
    context.notes.append(
        f"sequence.pool merged similar tokens (Token Merging, no training): the {layers} encoder layers run on "
        f"{', '.join(map(str, tokens))} of the {MAX_TOKENS} token positions, {work_share(MAX_TOKENS, layers, rate, merge_after):.0%} "
        "of the original's token-layers. Padding merges first and costs nothing, so short texts lose less than "
        "long ones.")
    if merge_after < params["merge_after"]:
        context.notes.append(f"merge_after {params['merge_after']} is past this encoder's {layers} layers: merging "
                             f"starts after layer {merge_after}, before the last one.")


def _learned_rate(net, params: dict, context, high: float) -> float:
    """The rate one short training picks for this task (services/engine/speech/train.learn_rate)."""
    from services.engine.speech.train import compute_share, learn_rate

    if high <= 1:
        raise context.user_error("Learning the rate needs a model trained once-for-all (it judges every rate "
                                 "without retraining); this one was fine-tuned at rate 1 only.")
    if context.task not in LABELLED_TASKS:  # refused at submit too (check): kept for direct callers
        raise context.user_error("Learning the rate needs the task's labels: score the run on spoken-digits or "
                                 "speaker-id, whose training loss it weighs against the compute saved.")
    fit = context.fit_set()
    learned = learn_rate(net, fit.inputs["features"], fit.inputs["lengths"], fit.labels, context.task,
                         penalty=params["rate_penalty"], steps=params["learn_steps"], max_rate=high,
                         progress=context.progress)
    context.notes.append(
        f"sequence.pool learned the rate {learned.rate:.2f} for {context.task} in one training of {learned.steps} "
        f"steps ({learned.seconds:.0f} s, weights frozen) at a compute penalty of {params['rate_penalty']:g}; the "
        f"encoder then does {compute_share(net, learned.rate):.0%} of its frame work.")
    return learned.rate


LABELLED_TASKS = ("spoken-digits", "speaker-id")
TEXT_TASKS = ("pydoc-retrieval",)


def check(params: dict, task: str) -> str:
    if params["learn_rate"] and task in TEXT_TASKS:
        return ("learning the rate is built for the speech encoder; for a text model, score a few rates (the Score "
                "every rate button) and pick from the curve.")
    if params["learn_rate"] and task not in LABELLED_TASKS:
        return ("learning the rate weighs the task's training loss against the compute saved, so score the run on "
                f"{' or '.join(LABELLED_TASKS)}, not {task}.")
    return ""


METHOD = Method(
    name="sequence.pool",
    title="Shorter sequences (once-for-all pooling)",
    explanation=(
        "Shortens the sequence inside the encoder, so that most layers work on a sequence up to `rate` times "
        "shorter: neighbouring audio frames are averaged (no retraining for a model trained once-for-all) or "
        "similar text tokens merged (no training at all). Faster, most of all on long inputs; tasks that read "
        "every position (digit strings) tolerate less shortening than tasks about the whole input (who speaks)."
    ),
    stage="torch",
    applies_to=("torch",),
    architectures=("speech-transformer", "text-transformer"),
    models=("speech-ssl", "speech-ssl-moco", "minilm-l6"),
    params=(
        Param("rate", "float", 2.0, "How many frames (audio) or tokens (text, by the last layer) become one: 1 = "
              "unchanged, 2 = a frame every 40 ms or half the tokens, 8 = every 160 ms or an eighth; any value in "
              "between works.", minimum=1.0, maximum=8.0, step=0.25, compresses="higher"),
        Param("merge_after", "int", 1, "Text models: how many encoder layers run on every token before merging "
              "starts (later merging keeps more, saves less). The speech encoder pools where it was trained, after "
              "layer 1.", minimum=0, maximum=11, step=1, architectures=("text-transformer",)),
        Param("learn_rate", "bool", False, "Let a short training pick the rate for the task the run is scored on, "
              "instead of trying rates one by one: it weighs the task's loss against the compute saved "
              "(the rate above is then ignored).", architectures=("speech-transformer",)),
        Param("rate_penalty", "float", 0.5, "When learning the rate: how much compute counts against the task's "
              "loss; higher picks a higher rate (faster, less accurate).", minimum=0.0, maximum=10.0, step=0.05,
              architectures=("speech-transformer",)),
        Param("learn_steps", "int", 100, "When learning the rate: training steps (weights frozen, only the rate "
              "moves).", minimum=10, maximum=2000, step=10, architectures=("speech-transformer",)),
    ),
    effect_note=("Parameters and file size do not change: the gain is time, which grows with the input's length "
                 "(per-call overhead hides it on short inputs at batch 1)."),
    apply=apply,
    check=check,
)
