"""`lmsmith chat MODEL`: a multi-turn chat in the terminal with the model's chat template.

Each turn renders the whole conversation with the tokenizer's chat template
(`apply_chat_template(..., add_generation_prompt=True)`), generates the reply
streaming, and adds it to the history; the engine's one slot keeps the previous
turns' keys/values, so a turn prefills only what is new. `/reset` starts over (keeping --system),
`/exit`, end of input (Ctrl-D) or Ctrl-C leave. When the conversation outgrows
the context, the oldest turns are dropped.
"""

from __future__ import annotations

import sys

HELP = "a multi-turn chat REPL with the model's chat template"
DESCRIPTION = __doc__.split("\n", 2)[2].strip() if __doc__ else HELP


def add_arguments(p) -> None:
    from .generate import add_generation_arguments

    p.add_argument("model", help="model directory (or .gguf file)")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    add_generation_arguments(p)


def run(args) -> int:
    from ..decoding import Engine, Request, resolve_config
    from ..errors import LmsmithError
    from .generate import config_from_args, draft_report, load_draft, load_for_generation

    config = config_from_args(args)
    if config.strategy == "beam":
        raise LmsmithError("chat streams its replies; use a greedy or sampling strategy, not beam")
    model, tokenizer = load_for_generation(args)
    config = resolve_config(tokenizer, config)
    ctx = model.config.max_seq_len
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    # One slot kept across turns: each turn's prompt starts with the last one's tokens, whose
    # keys/values the engine reuses (prompt caching), so only the new message is prefilled.
    engine = Engine(model, max_batch=1, decode=decode,
                    draft=load_draft(args, model, tokenizer), draft_tokens=args.draft_tokens)
    print("chat: /reset to start over, /exit to leave", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = []
            print("(conversation reset)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids, history = _fit(tokenizer, system, history, ctx, config.max_new_tokens)
        if ids is None:
            print("(that message alone is longer than the context; try a shorter one)", file=sys.stderr)
            history.pop()
            continue
        sys.stdout.write("assistant> ")
        sys.stdout.flush()
        pieces = []
        rid = engine.submit(Request(ids, config))
        try:
            while engine.busy:
                for ev in engine.step():
                    if ev.text:
                        pieces.append(ev.text)
                        sys.stdout.write(ev.text)
                        sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this reply; keep what was said
            engine.cancel(rid)
            engine.step()
        sys.stdout.write("\n")
        if engine.drafter is not None:  # the draft's acceptance so far
            print(f"({draft_report(engine.stats)[2:]})", file=sys.stderr)
        history.append({"role": "assistant", "content": "".join(pieces)})


def _fit(tokenizer, system, history, ctx, max_new):
    """Prompt ids for system + history, dropping the oldest turns until a reply of max_new tokens fits."""
    from ..decoding import encode_chat

    room = max(1, ctx - min(max_new, ctx // 2))  # keep at least half the context for the reply's budget
    while True:
        ids = encode_chat(tokenizer, system + history)
        if len(ids) <= room:
            return ids, history
        if len(history) <= 1:
            return None, history
        history = history[2:] if len(history) > 2 else history[1:]
