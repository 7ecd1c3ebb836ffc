"""The `emllm` command line. Entry points only: each command calls the engine's and the store's public API.

emllm demo                                   the README's demo
emllm chat --session NAME                    streaming chat that remembers across runs
emllm ingest FILE... --session NAME          read documents into a session
emllm ask --session NAME "question"          one question against a session
emllm sessions [list | info NAME | rm NAME]  what the store holds
emllm sessions [gc | recover | backup DEST]  store upkeep: stray files, a lost index, a consistent copy
emllm plot --session NAME -o out.png         a picture of the segmentation
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from . import __version__
from .config import DEFAULT_MODEL
from .errors import EMLLMError


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MB"


# -- shared set-up ---------------------------------------------------------------------------------


def _store(args: argparse.Namespace):
    from .store import SessionStore

    max_ram = int(args.max_ram_mb * 2**20) if getattr(args, "max_ram_mb", None) else None
    return SessionStore(args.store, max_ram_bytes=max_ram)


def _engine(args: argparse.Namespace):
    from .engine import EMLLM

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    return EMLLM.from_pretrained(args.model, store=_store(args))


def _summary(session) -> str:
    stats = session.stats()
    return f"{stats.tokens:,} tokens in {stats.events} events ({_mb(stats.disk_bytes)} on disk)"


def _user_turn(tokenizer, session, content: str, system: str | None) -> str:
    """The text that appends one user turn (and the assistant's opening) to what the session holds.

    The session's transcript is the conversation itself: a first turn is rendered whole (with the system
    prompt); later ones are the difference the chat template adds after an assistant reply, minus the end
    marker the model already generated itself.
    """
    from .chat import render_chat

    if not session.token_ids:
        opening = [{"role": "system", "content": system}] if system else []
        return render_chat(tokenizer, [*opening, {"role": "user", "content": content}])
    before = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]
    base = render_chat(tokenizer, before, add_generation_prompt=False)
    full = render_chat(tokenizer, [*before, {"role": "user", "content": content}])
    if not full.startswith(base):
        raise EMLLMError(
            "this chat template re-renders earlier turns; use a chat adapter that re-sends history"
        )
    closing = base[base.rindex("B") + 1 :]  # what the template writes after an assistant reply
    eos = tokenizer.eos_token or ""
    ended_itself = session.token_ids[-1] in session.engine.eos_token_ids
    if ended_itself and eos and closing.startswith(eos):
        closing = closing[len(eos) :]
    return closing + full[len(base) :]


def _reply(session, turn: str, args: argparse.Namespace) -> str:
    answer = ""
    for piece in session.stream(turn, max_new_tokens=args.max_new_tokens, temperature=args.temperature):
        answer += piece
        print(piece, end="", flush=True)
    print(flush=True)
    return answer


# -- commands ----------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model=args.model, max_new_tokens=args.max_new_tokens)
    return 0


def _chat(args: argparse.Namespace) -> int:
    engine = _engine(args)
    session = engine.session(args.session)
    print(f"session {args.session!r}: {_summary(session)}. Type /quit (or Ctrl-D) to leave.", flush=True)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                break
            if line.strip() in ("/quit", "/exit"):
                break
            if not line.strip():
                continue
            print("assistant> ", end="", flush=True)
            _reply(session, _user_turn(engine.tokenizer, session, line, args.system), args)
            session.save()
    finally:
        if session.token_ids:
            session.save()
        print(f"saved: {_summary(session)}", file=sys.stderr)
        engine.close()
    return 0


def _ingest(args: argparse.Namespace) -> int:
    engine = _engine(args)
    session = engine.session(args.session)
    try:
        for path in args.files:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            added = session.feed(text, source_id=str(path), progress=True)
            session.save()
            print(f"{path}: {added:,} tokens", flush=True)
        print(f"session {args.session!r}: {_summary(session)}")
    finally:
        engine.close()
    return 0


def _ask(args: argparse.Namespace) -> int:
    engine = _engine(args)
    session = engine.session(args.session)
    try:
        if args.show_events:
            print("events retrieved for the question:")
            for hit in session.retrieve(args.question, k=args.show_events):
                snippet = textwrap.shorten(" ".join(hit.text.split()), 100)
                print(f"  event {hit.event_id} [{hit.source_id}] score {hit.score:.2f}: {snippet}")
        _reply(session, _user_turn(engine.tokenizer, session, args.question, args.system), args)
        if args.save:
            session.save()
    finally:
        engine.close()
    return 0


def _sessions(args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action == "recover":
        from .store import SessionStore

        store = SessionStore.recover(args.store)
        print(f"index of {store.root} rebuilt from the session files: {len(store.list())} sessions")
        return 0
    store = _store(args)
    if action == "gc":
        print(f"removed {store.remove_orphans()} stray files from {store.root}")
        return 0
    if action == "backup":
        if not args.name:
            raise SystemExit("emllm sessions backup: give the folder to copy the store into")
        failed = store.backup(args.name)
        print(f"copied {len(store.list()) - len(failed)} sessions to {args.name}")
        if failed:
            print(f"emllm: error: not copied (damaged): {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0
    if action == "list":
        stored = store.list()
        if not stored:
            print(f"no sessions in {store.root}")
        for s in stored:
            print(f"{s.id}\t{s.tokens:,} tokens\t{s.events} events\t{_mb(s.bytes)}\t{s.model_name}")
        return 0
    if not args.name:
        raise SystemExit(f"emllm sessions {action}: give a session name")
    if action == "info":
        info = store.info(args.name)
        for field in ("id", "model_name", "fingerprint", "tokens", "events", "bytes"):
            print(f"{field}: {getattr(info, field)}")
        if args.verify:
            store.verify(args.name)
            print("verify: every file matches its checksum")
        return 0
    store.delete(args.name)
    print(f"removed session {args.name!r}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_segmentation

    engine = _engine(args)
    try:
        session = engine.session(args.session, create=False)
        path = plot_segmentation(session, args.output, last_tokens=args.last)
        print(f"wrote {path} ({_summary(session)})")
    finally:
        engine.close()
    return 0


# -- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emllm",
        description="EM-LLM episodic memory for Hugging Face decoders: unbounded context on a small window.",
    )
    parser.add_argument("--version", action="version", version=f"emllm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", default=None, help="session store folder (default: $EMLLM_HOME/sessions)")
    model = argparse.ArgumentParser(add_help=False, parents=[store])
    model.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model id, path or .gguf (default: {DEFAULT_MODEL})"
    )
    model.add_argument(
        "--max-ram-mb", type=float, default=None, help="events kept in RAM before spilling to disk"
    )
    session = argparse.ArgumentParser(add_help=False)
    session.add_argument("--session", required=True, help="session name (created on first use)")
    generation = argparse.ArgumentParser(add_help=False)
    generation.add_argument(
        "--max-new-tokens", type=int, default=256, help="reply length bound (default: 256)"
    )
    generation.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generation.add_argument("--system", default=None, help="system prompt of a new conversation")

    demo = commands.add_parser(
        "demo", help="read a 20k-token novel excerpt with a planted fact and answer a question about it"
    )
    demo.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model id, path or .gguf (default: {DEFAULT_MODEL})"
    )
    demo.add_argument("--max-new-tokens", type=int, default=24, help="answer length bound (default: 24)")
    demo.set_defaults(handler=_demo)

    chat = commands.add_parser(
        "chat", parents=[model, session, generation], help="chat in a session that remembers across runs"
    )
    chat.set_defaults(handler=_chat)

    ingest = commands.add_parser("ingest", parents=[model, session], help="read text files into a session")
    ingest.add_argument("files", nargs="+", help="UTF-8 text files")
    ingest.set_defaults(handler=_ingest)

    ask = commands.add_parser(
        "ask", parents=[model, session, generation], help="ask one question of a session"
    )
    ask.add_argument("question")
    ask.add_argument("--show-events", type=int, default=0, metavar="K", help="print the K events retrieved")
    ask.add_argument("--save", action="store_true", help="keep the question and answer in the session")
    ask.set_defaults(handler=_ask)

    sessions = commands.add_parser(
        "sessions", parents=[store], help="list, inspect or remove stored sessions"
    )
    sessions.add_argument(
        "action",
        nargs="?",
        choices=["list", "info", "rm", "gc", "recover", "backup"],
        help="default: list; gc: remove files crashed saves left; recover: rebuild a damaged or lost index "
        "from the session files; backup DEST: copy the store, consistently, while it is in use",
    )
    sessions.add_argument("name", nargs="?", help="session name (info, rm) or folder (backup)")
    sessions.add_argument("--verify", action="store_true", help="info: check every file's checksums")
    sessions.set_defaults(handler=_sessions)

    plot = commands.add_parser("plot", parents=[model, session], help="plot a session's event segmentation")
    plot.add_argument("-o", "--output", required=True, help="PNG file to write")
    plot.add_argument("--last", type=int, default=None, metavar="N", help="only the last N tokens")
    plot.set_defaults(handler=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (EMLLMError, OSError) as exc:
        print(f"emllm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
